"""The one flow: plan (decide, change nothing) and install (decide, provision, write the spec file).

    from mint_proxy.isolation import install, plan

    for decision in plan(["dist/peak_picking-1.0-py3-none-any.whl"], find_links=["wheelhouse"]):
        print(decision.plugin, decision.mode, decision.clashes)
    install(["dist/peak_picking-1.0-py3-none-any.whl"], config="plugins.toml", find_links=["wheelhouse"])

Plugin homes: ``home`` (default ``<config dir>/.mint-plugins``) holds ``venvs/``, the uv
cache ``uv-cache/`` (same filesystem, so installs are hardlinks) and ``wheels/``, a copy
of every installed wheel so that ``recheck`` can decide again after the platform changed.
"""

import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ._uv import Sources, Uv
from .decision import Decision, decide
from .envs import PluginEnv, install_shared, provision, restore_platform, uninstall_shared
from .errors import InstallError, InvalidPluginName, WheelError
from .overrides import Overrides
from .platform import InstalledDist, PlatformEnv, inspect_platform
from .specfile import SpecEntry, managed_entries, update_spec_file
from .wheels import PluginWheel, read_wheel

HOME_NAME = ".mint-plugins"


@dataclass(frozen=True)
class Installed:
    """One installed plugin: its decision and, when isolated, its venv."""

    decision: Decision
    env: PluginEnv | None = None


@dataclass(frozen=True)
class _Context:
    platform: PlatformEnv
    uv: Uv
    overrides: Overrides = field(default_factory=Overrides)


def _context(
    python: str | Path | None,
    find_links: Iterable[str | Path],
    no_index: bool | None,
    uv_binary: str | None,
    cache_dir: Path | None,
    overrides: Overrides | None,
) -> _Context:
    sources = Sources(tuple(Path(directory) for directory in find_links), no_index)
    return _Context(inspect_platform(python), Uv(uv_binary, cache_dir, sources), overrides or Overrides())


def _read_all(wheels: Iterable[str | Path]) -> list[PluginWheel]:
    read = [read_wheel(wheel) for wheel in wheels]
    seen: dict[str, Path] = {}
    for wheel in read:
        if wheel.slug in seen:
            raise InvalidPluginName(wheel.slug, f"given twice: {seen[wheel.slug]} and {wheel.path}")
        seen[wheel.slug] = wheel.path
    return read


def _decide_all(wheels: list[PluginWheel], context: _Context) -> list[Decision]:
    platform = context.platform
    decisions = []
    for wheel in wheels:
        decision = decide(wheel, platform, context.uv, context.overrides)
        decisions.append(decision)
        if decision.mode == "shared":  # it joins the platform: later plugins are checked against it too
            own = InstalledDist(wheel.name, str(wheel.version), tuple(str(req) for req in wheel.requires))
            platform = platform.with_planned([*decision.would_install, own])
    return decisions


def plan(
    wheels: Iterable[str | Path],
    *,
    python: str | Path | None = None,
    find_links: Iterable[str | Path] = (),
    no_index: bool | None = None,
    overrides: Overrides | None = None,
    uv_binary: str | None = None,
) -> list[Decision]:
    """Decide shared or isolated for each wheel (``path`` or ``path[extra,...]``), changing nothing.

    ``python`` is the platform's interpreter (default: this one). Wheels are decided in
    order; one decided shared counts as part of the platform for those after it.
    """
    context = _context(python, find_links, no_index, uv_binary, None, overrides)
    return _decide_all(_read_all(wheels), context)


def install(
    wheels: Iterable[str | Path],
    *,
    config: str | Path,
    python: str | Path | None = None,
    home: str | Path | None = None,
    find_links: Iterable[str | Path] = (),
    no_index: bool | None = None,
    overrides: Overrides | None = None,
    uv_binary: str | None = None,
) -> list[Installed]:
    """Decide, provision (venv or platform install) and write the plugins into ``config``.

    Reinstalling a plugin decides again. A plugin that moves from shared to isolated
    has its distribution removed from the platform's environment.
    """
    config = Path(config)
    home_dir = Path(home) if home is not None else config.parent / HOME_NAME
    wheel_list = _read_all(wheels)
    for wheel in wheel_list:
        if wheel.app is None:
            raise WheelError(wheel.slug, f"{wheel.path} declares no [mint.plugins] entry point naming its ASGI app")
    context = _context(python, find_links, no_index, uv_binary, home_dir / "uv-cache", overrides)
    decisions = _decide_all(wheel_list, context)
    previous = managed_entries(config)
    results: list[Installed] = []
    for decision in decisions:
        if decision.mode == "isolated":
            env = provision(decision.wheel, context.platform, venvs_dir=home_dir / "venvs", uv=context.uv)
            results.append(Installed(decision, env))
    shared_done: list[Decision] = []
    try:
        for decision in decisions:
            if decision.mode == "shared":
                # pinned against the environment as it is now, earlier shared plugins of this batch included
                current = inspect_platform(context.platform.python) if shared_done else context.platform
                install_shared(decision.wheel, current, context.uv, constrained=not decision.forced)
                shared_done.append(decision)
                results.append(Installed(decision))
        _keep_wheels(wheel_list, home_dir / "wheels")
        entries = [
            SpecEntry(
                r.decision.plugin, r.decision.mode, r.decision.wheel.app or "", str(r.env.python) if r.env else None
            )
            for r in results
        ]
        update_spec_file(config, entries)
    except BaseException:
        if shared_done:  # earlier shared plugins of this batch went in: put the platform back
            restore_platform(context.platform, context.uv, plugin=shared_done[0].plugin)
        raise
    for decision in decisions:  # moved out of the platform: take its old copy out too
        if decision.mode == "isolated" and previous.get(decision.plugin) == "shared":
            uninstall_shared(decision.wheel.name, context.platform, context.uv, plugin=decision.plugin)
    order = {decision.plugin: index for index, decision in enumerate(decisions)}
    return sorted(results, key=lambda result: order[result.decision.plugin])


def _keep_wheels(wheels: list[PluginWheel], directory: Path) -> None:
    """Keep ``directory/<slug>/<wheel file>``, the last installed wheel of each plugin."""
    try:
        for wheel in wheels:
            target = directory / wheel.slug / wheel.path.name
            if target.exists() and target.resolve() == wheel.path.resolve():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            for old in target.parent.glob("*.whl"):
                old.unlink()
            shutil.copy2(wheel.path, target)
    except OSError as exc:
        raise InstallError("", f"cannot keep a copy of the wheels in {directory}: {exc}") from None


def recheck(
    *,
    config: str | Path,
    python: str | Path | None = None,
    home: str | Path | None = None,
    find_links: Iterable[str | Path] = (),
    no_index: bool | None = None,
    overrides: Overrides | None = None,
    uv_binary: str | None = None,
    apply: bool = False,
) -> list[Decision]:
    """Decide the shared plugins of ``config`` again, after the platform's environment changed.

    Whichever plugin was installed first got the shared slot; a platform upgrade can take
    it away. With ``apply=True`` a plugin that now clashes is reinstalled (isolated).
    """
    config = Path(config)
    if not config.is_file():
        raise InstallError("", f"{config}: no such spec file (recheck reads the plugins an install wrote there)")
    home_dir = Path(home) if home is not None else config.parent / HOME_NAME
    shared = [slug for slug, mode in managed_entries(config).items() if mode == "shared"]
    wheels = []
    for slug in shared:
        kept = sorted((home_dir / "wheels" / slug).glob("*.whl"))
        if not kept:
            raise WheelError(slug, f"no copy of its wheel in {home_dir / 'wheels'}: install it again")
        wheels.append(read_wheel(kept[-1]))
    context = _context(python, find_links, no_index, uv_binary, home_dir / "uv-cache", overrides)
    decisions = [decide(wheel, context.platform, context.uv, context.overrides) for wheel in wheels]
    moved = [decision.wheel.path for decision in decisions if decision.mode == "isolated"]
    if apply and moved:
        install(moved, config=config, python=python, home=home_dir, find_links=find_links, no_index=no_index,
                overrides=overrides, uv_binary=uv_binary)  # fmt: skip
    return decisions
