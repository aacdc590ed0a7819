"""Can a plugin join the platform's environment? Stage 1 (packaging) then stage 2 (uv).

Stage 1 is instant and certain in one direction: a requirement of the plugin that
applies on the platform (markers evaluated against the platform interpreter, with the
extras asked for) and excludes the version installed there is a clash. Passing stage 1
proves nothing about transitive requirements, so stage 2 asks uv to resolve the plugin
against the platform's environment with every installed distribution pinned as a
constraint: shared mode only if that succeeds and nothing installed would change, so
the platform and every plugin already shared keep exactly the versions they run with.

Shared plugins planned earlier in the same batch count as installed: their name and
version, and the versions uv said they would add, join the pins.
"""

import re
import tempfile
import zipfile
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import UndefinedComparison, UndefinedEnvironmentName
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import InvalidVersion, Version

from ._uv import Uv, uv_message
from .errors import UnsatisfiableRequirement, WheelError
from .platform import InstalledDist, PlatformEnv
from .wheels import PluginWheel

_WOULD_INSTALL = re.compile(r"^ \+ (?P<name>[A-Za-z0-9._-]+)(?:\[[^\]]*\])?(?:==(?P<version>\S+)| @ )")
_WOULD_REMOVE = re.compile(r"^ - (?P<name>[A-Za-z0-9._-]+)(?:==(?P<version>\S+))?")
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)(?:\[[^\]]*\])?==(?P<version>\S+)(?:\s+# via (?P<via>.*))?$")


@dataclass(frozen=True)
class CheckResult:
    """What a stage found: the clashes in words, and for a pass, what uv would add."""

    clashes: tuple[str, ...]
    would_install: tuple[InstalledDist, ...] = ()


def applies(requirement: Requirement, markers: dict[str, str], extras: Iterable[str]) -> bool:
    """Whether ``requirement`` applies on the platform, with ``extras`` of its owner requested."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**markers, "extra": extra}) for extra in ("", *extras))


def stage1(wheel: PluginWheel, platform: PlatformEnv) -> CheckResult:
    """Direct requirements against installed versions, with packaging only: no I/O.

    Raises ``UnsatisfiableRequirement`` if the plugin's own requirements on one
    distribution can never be met together (``numpy>=2`` and ``numpy<2``).
    """
    combined: dict[NormalizedName, list[Requirement]] = {}
    for requirement in wheel.requires:
        try:
            applied = applies(requirement, platform.markers, wheel.extras)
        except (UndefinedComparison, UndefinedEnvironmentName) as exc:
            raise WheelError(
                wheel.slug,
                f"{wheel.path.name} has broken metadata: the marker of {requirement} cannot be evaluated: {exc}",
            ) from None
        if applied:
            combined.setdefault(canonicalize_name(requirement.name), []).append(requirement)
    clashes: list[str] = []
    for name, requirements in sorted(combined.items()):
        specifier = SpecifierSet()
        for requirement in requirements:
            specifier &= requirement.specifier
        if specifier.is_unsatisfiable():
            listed = ", ".join(f"{req.name}{req.specifier}" for req in requirements)
            raise UnsatisfiableRequirement(
                wheel.slug, f"its requirements on {name} can never be met together: {listed}"
            )
        installed = platform.dists.get(name)
        if installed is None or name == wheel.name:
            continue
        if not _contains(specifier, installed.version):
            clashes.append(_clash(wheel, f"{requirements[0].name}{specifier}", "", platform, name))
    return CheckResult(tuple(clashes))


def _contains(specifier: SpecifierSet, version: str) -> bool:
    try:
        parsed = Version(version)
    except InvalidVersion:  # legacy version string: only === can name it
        return all(spec.operator == "===" and spec.version == version for spec in specifier) and bool(len(specifier))
    # An installed pre-release is what the platform runs: judge it by the range, not the opt-in rule.
    return specifier.contains(parsed, prereleases=True)


def _clash(wheel: PluginWheel, needs: str, through: str, platform: PlatformEnv, name: NormalizedName) -> str:
    installed = platform.dists[name]
    why = platform.requirements_on(name, excluding=frozenset({wheel.name}))
    where = "a shared plugin planned before it brings" if name in platform.planned else "the platform has"
    via = f" (through {through})" if through else ""
    text = f"{wheel.slug} needs {needs}{via}; {where} {installed.name} {installed.version}"
    return text + (f" ({'; '.join(why)})" if why else "")


def stage2(wheel: PluginWheel, platform: PlatformEnv, uv: Uv) -> CheckResult:
    """Resolve with uv against the platform's environment, every installed distribution pinned."""
    with tempfile.TemporaryDirectory(prefix="mint-plan-") as tmp:
        pins = Path(tmp, "pins.txt")
        pins.write_text(platform.pins(excluding=frozenset({wheel.name})))
        requirements = Path(tmp, "requirements.txt")
        requirements.write_text(wheel.requirement_line() + "\n")
        result = uv.run(
            [
                "pip", "install", "--dry-run", "--python", platform.python,
                "-c", str(pins), "-r", str(requirements), *uv.sources.args(),
            ],
            plugin=wheel.slug,
        )  # fmt: skip
        if result.returncode == 0:
            output = result.stdout + result.stderr
            removed = [m["name"] for line in output.splitlines() if (m := _WOULD_REMOVE.match(line))]
            changed = [name for name in removed if canonicalize_name(name) != wheel.name]
            if changed:
                return CheckResult(tuple(f"{wheel.slug} would change installed {name}" for name in changed))
            added = [
                InstalledDist(m["name"], m["version"] or str(wheel.version))
                for line in output.splitlines()
                if (m := _WOULD_INSTALL.match(line))
            ]
            return CheckResult((), tuple(added))
        return CheckResult(_explain(wheel, platform, uv, Path(tmp), uv_message(result)))


_Resolved = dict[NormalizedName, tuple[str, list[NormalizedName]]]


def _explain(wheel: PluginWheel, platform: PlatformEnv, uv: Uv, tmp: Path, uv_said: str) -> tuple[str, ...]:
    """Name the clashes uv found.

    Resolve the plugin alone (installed versions as preferences) to find candidates: the
    installed distributions it would move. A candidate whose pin alone, when lifted, lets
    the plugin resolve is a clash by itself; if no single one does, every candidate is named.
    """
    own = frozenset({wheel.name})
    alone = _compile(wheel, platform, uv, tmp, pinned=None)
    if isinstance(alone, str):
        raise UnsatisfiableRequirement(wheel.slug, f"its requirements cannot be resolved:\n{alone}")
    candidates = [
        name
        for name, (version, _) in sorted(alone.items())
        if name in platform.dists and name != wheel.name and platform.dists[name].version != version
    ]
    found: list[tuple[NormalizedName, _Resolved]] = []
    for name in candidates:
        relaxed = _compile(wheel, platform, uv, tmp, pinned=own | {name})
        if not isinstance(relaxed, str):
            found.append((name, relaxed))
    if not found:
        found = [(name, alone) for name in candidates]
    clashes = [_describe(wheel, platform, uv, name, resolved) for name, resolved in found]
    if not clashes:
        clashes.append(f"{wheel.slug} cannot be resolved against the platform's environment: {uv_said}")
    return tuple(clashes)


def _compile(
    wheel: PluginWheel, platform: PlatformEnv, uv: Uv, tmp: Path, *, pinned: frozenset[NormalizedName] | None
) -> _Resolved | str:
    """``uv pip compile`` of the plugin: unconstrained (``pinned=None``, installed versions as
    preferences) or with every installed distribution except ``pinned`` as a constraint.
    Returns uv's message when it finds no resolution."""
    output = tmp / "resolved.txt"
    output.write_text(platform.pins(excluding=frozenset({wheel.name})))
    args = [
        "pip", "compile", "--quiet", "--python", platform.python, "--annotation-style", "line", "--no-header",
        *uv.sources.args(), "-o", str(output), str(tmp / "requirements.txt"),
    ]  # fmt: skip
    if pinned is not None:
        constraints = tmp / "relaxed.txt"
        constraints.write_text(platform.pins(excluding=pinned))
        args += ["-c", str(constraints)]
    result = uv.run(args, plugin=wheel.slug)
    if result.returncode != 0:
        return uv_message(result)
    resolved: _Resolved = {}
    for line in output.read_text().splitlines():
        if match := _PIN.match(line.strip()):
            via = [canonicalize_name(parent.strip()) for parent in (match["via"] or "").split(",") if parent.strip()]
            resolved[canonicalize_name(match["name"])] = (match["version"], via)
    return resolved


def _describe(wheel: PluginWheel, platform: PlatformEnv, uv: Uv, name: NormalizedName, resolved: _Resolved) -> str:
    version = resolved[name][0]
    chain = _chain(name, wheel.name, resolved)
    parent = chain[-1] if chain else wheel.name
    needs = _requirement_of(parent, resolved, wheel, uv, name) or f"{name} {version}"
    through = ", ".join(f"{step} {resolved[step][0]}" for step in chain)
    return _clash(wheel, needs, through, platform, name)


def _chain(
    name: NormalizedName, root: NormalizedName, resolved: dict[NormalizedName, tuple[str, list[NormalizedName]]]
) -> list[NormalizedName]:
    """The shortest path root → ... → name through ``# via`` annotations, without both ends."""
    parents: dict[NormalizedName, NormalizedName | None] = {name: None}
    queue = deque([name])
    while queue:
        node = queue.popleft()
        for parent in resolved.get(node, ("", []))[1]:
            if parent in parents:
                continue
            parents[parent] = node
            if parent == root:
                path: list[NormalizedName] = []
                step = parents[parent]
                while step is not None and step != name:
                    path.append(step)
                    step = parents[step]
                return path
            queue.append(parent)
    return []


def _requirement_of(
    parent: NormalizedName,
    resolved: dict[NormalizedName, tuple[str, list[NormalizedName]]],
    wheel: PluginWheel,
    uv: Uv,
    name: NormalizedName,
) -> str | None:
    """The specifier ``parent`` puts on ``name``, read from its wheel if it is at hand."""
    if parent == wheel.name:
        requires: Iterable[str] = (str(req) for req in wheel.requires)
    else:
        requires = _wheel_requires(parent, resolved.get(parent, ("", []))[0], uv.sources.find_links)
    for line in requires:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) == name:
            return f"{requirement.name}{requirement.specifier}" if requirement.specifier else None
    return None


def _wheel_requires(name: str, version: str, directories: Iterable[Path]) -> list[str]:
    stem = name.replace("-", "_")
    for directory in directories:
        for path in Path(directory).glob("*.whl"):
            parts = path.name.split("-")
            if len(parts) < 2 or canonicalize_name(parts[0]) != canonicalize_name(stem) or parts[1] != version:
                continue
            try:
                with zipfile.ZipFile(path) as archive:
                    metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
                    text = archive.read(metadata).decode("utf-8", "replace")
            except (OSError, zipfile.BadZipFile, StopIteration):
                continue
            return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]
    return []
