"""Plugin environments with uv: a venv per isolated plugin, and shared installs into the platform.

Isolated venvs live in ``venvs_dir/<key>``, where the key hashes the resolved
requirements (the plugin wheel by content), the interpreter and the bundled
``mint_plugin`` package: restarts and identical plugins reuse one venv. A venv is
built in a temporary directory beside its final place and renamed into place once
complete, so a half-built venv is never used. A per-key ``flock`` makes concurrent
provisioning of one key build it once; the loser of a rename race (a lock that did not
hold, e.g. on a network filesystem) throws its copy away and uses the winner's.

uv's cache belongs on the venvs' filesystem (``<home>/uv-cache``): uv then hardlinks
installed files out of it instead of copying them. Bytecode is compiled while
provisioning, not at the plugin's first import.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import mint_plugin

from ._uv import Uv, uv_message
from .errors import EnvironmentBuildError, PlatformEnvError, UnsatisfiableRequirement
from .platform import PlatformEnv
from .wheels import PluginWheel

#: What the plugin host and the platform client need inside every isolated venv.
RUNTIME_REQUIREMENTS = ("uvicorn>=0.30", "httpx>=0.27")
READY_FILE = "mint-venv.json"


@dataclass(frozen=True)
class PluginEnv:
    """A provisioned isolated venv: where it is, its interpreter, and whether it was reused."""

    key: str
    path: Path
    python: Path
    reused: bool


def _mint_plugin_digest() -> str:
    root = Path(mint_plugin.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def resolve(wheel: PluginWheel, platform: PlatformEnv, uv: Uv, extra: Sequence[str] = RUNTIME_REQUIREMENTS) -> str:
    """The plugin's full requirement set pinned by uv, one ``name==version`` per line."""
    with tempfile.TemporaryDirectory(prefix="mint-resolve-") as tmp:
        requirements = Path(tmp, "requirements.in")
        requirements.write_text("\n".join([wheel.requirement_line(), *extra]) + "\n")
        result = uv.run(
            ["pip", "compile", "--python", platform.python, "--no-header", "--no-annotate", *uv.sources.args(),
             str(requirements)],
            plugin=wheel.slug,
        )  # fmt: skip
    if result.returncode != 0:
        raise UnsatisfiableRequirement(wheel.slug, f"its requirements cannot be resolved:\n{uv_message(result)}")
    return result.stdout


def venv_key(resolved: str, wheel: PluginWheel, platform: PlatformEnv) -> str:
    """Hash of (resolved requirements with the wheel by content, interpreter, mint_plugin)."""
    own = wheel.requirement_line()
    lines = sorted(
        f"{wheel.name} sha256={wheel.sha256}" if line.strip() == own or line.startswith(f"{wheel.name} @ ") else line
        for line in resolved.splitlines()
        if line.strip() and not line.startswith("#")
    )
    material = json.dumps({"python": platform.identity, "requirements": lines, "mint_plugin": _mint_plugin_digest()})
    return hashlib.sha256(material.encode()).hexdigest()[:20]


def provision(wheel: PluginWheel, platform: PlatformEnv, *, venvs_dir: Path, uv: Uv) -> PluginEnv:
    """The plugin's venv under ``venvs_dir``: reused if its key exists, else built and renamed into place."""
    try:
        venvs_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=".probe-", dir=venvs_dir)
        os.rmdir(probe)
    except OSError as exc:
        raise EnvironmentBuildError(
            wheel.slug, f"the venv directory {venvs_dir} is not writable: {exc.strerror}"
        ) from None
    resolved = resolve(wheel, platform, uv)
    key = venv_key(resolved, wheel, platform)
    final = venvs_dir / key
    if (final / READY_FILE).exists():
        return PluginEnv(key, final, final / "bin" / "python", reused=True)
    with _locked(venvs_dir / f".{key}.lock"):
        if (final / READY_FILE).exists():  # built by whoever held the lock before us
            return PluginEnv(key, final, final / "bin" / "python", reused=True)
        _build(wheel, platform, uv, resolved, key, final)
    return PluginEnv(key, final, final / "bin" / "python", reused=False)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(wheel: PluginWheel, platform: PlatformEnv, uv: Uv, resolved: str, key: str, final: Path) -> None:
    """Clone the runtime layer with hardlinks, sync the plugin's requirements, compile what is new."""
    base = _runtime_layer(wheel, platform, uv, final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
    try:
        os.rmdir(tmp)
        shutil.copytree(base, tmp, symlinks=True, copy_function=_link_or_copy)
        (tmp / READY_FILE).unlink()
        (tmp / "requirements.txt").write_text(resolved)
        _run(
            uv,
            ["pip", "sync", "--quiet", "--python", str(tmp / "bin" / "python"), *uv.sources.args(),
             str(tmp / "requirements.txt")],
            wheel,
        )  # fmt: skip
        _compile(tmp, wheel, platform.cache_tag)
        _finish(tmp, final, {"key": key, "plugin": wheel.slug, "version": str(wheel.version)})
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise EnvironmentBuildError(wheel.slug, f"cannot build its venv in {final.parent}: {exc}") from None
        raise


def _runtime_layer(wheel: PluginWheel, platform: PlatformEnv, uv: Uv, venvs_dir: Path) -> Path:
    """A compiled venv with only the runtime (uvicorn, httpx, mint_plugin), built once per interpreter.

    Every plugin venv starts as a hardlinked clone of it, so the runtime's files and bytecode
    are never written or compiled again: a new plugin venv compiles only its own packages.
    """
    with tempfile.TemporaryDirectory(prefix="mint-runtime-") as scratch:
        requirements = Path(scratch, "runtime.in")
        requirements.write_text("\n".join(RUNTIME_REQUIREMENTS) + "\n")
        result = uv.run(
            ["pip", "compile", "--quiet", "--python", platform.python, "--no-header", "--no-annotate",
             *uv.sources.args(), str(requirements)],
            plugin=wheel.slug,
        )  # fmt: skip
    if result.returncode != 0:
        raise UnsatisfiableRequirement(wheel.slug, f"the plugin runtime cannot be resolved:\n{uv_message(result)}")
    material = json.dumps({"python": platform.identity, "runtime": result.stdout, "mint_plugin": _mint_plugin_digest()})
    base = venvs_dir / f".runtime-{hashlib.sha256(material.encode()).hexdigest()[:20]}"
    if (base / READY_FILE).exists():
        return base
    with _locked(venvs_dir / f"{base.name}.lock"):
        if (base / READY_FILE).exists():
            return base
        tmp = Path(tempfile.mkdtemp(prefix=f"{base.name}-", dir=venvs_dir))
        try:
            _run(
                uv,
                ["venv", "--quiet", "--relocatable", "--allow-existing", "--python", platform.python, str(tmp)],
                wheel,
            )
            (tmp / "requirements.txt").write_text(result.stdout)
            _run(
                uv,
                ["pip", "sync", "--quiet", "--compile-bytecode", "--python", str(tmp / "bin" / "python"),
                 *uv.sources.args(), str(tmp / "requirements.txt")],
                wheel,
            )  # fmt: skip
            site_packages = next(tmp.glob("lib/*/site-packages"))
            source = Path(mint_plugin.__file__).parent
            shutil.copytree(source, site_packages / "mint_plugin", ignore=shutil.ignore_patterns("__pycache__"))
            _compile(tmp, wheel, platform.cache_tag)
            _finish(tmp, base, {"runtime": True})
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise EnvironmentBuildError(
                    wheel.slug, f"cannot build the plugin runtime in {venvs_dir}: {exc}"
                ) from None
            raise
    return base


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # a filesystem without hardlinks
        shutil.copy2(source, target)


def _compile(venv: Path, wheel: PluginWheel, cache_tag: str) -> None:
    """Compile the site-packages files that have no bytecode yet, with the venv's own interpreter.

    Files cloned from the runtime layer keep their (hardlinked) bytecode; only new ones are
    compiled, in parallel when there are many (a numpy has hundreds).
    """
    site_packages = next(venv.glob("lib/*/site-packages"))
    tag = f".{cache_tag}.pyc"
    missing = [
        os.path.join(root, name)
        for root, dirs, files in os.walk(site_packages)
        for name in files
        if name.endswith(".py") and not os.path.exists(os.path.join(root, "__pycache__", name[:-3] + tag))
    ]
    missing = _borrow_bytecode(venv, site_packages, missing, tag)
    if not missing:
        return
    listing = venv / ".compile-list"
    listing.write_text("\n".join(missing) + "\n")
    parallel = ["-j", "0"] if len(missing) > 100 else []
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-I", "-m", "compileall", "-q", *parallel, "-i", str(listing)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    listing.unlink()
    if result.returncode != 0:
        raise EnvironmentBuildError(wheel.slug, f"compiling its bytecode failed:\n{result.stdout}{result.stderr}")


def _borrow_bytecode(venv: Path, site_packages: Path, missing: list[str], tag: str) -> list[str]:
    """Hardlink bytecode from sibling venvs whose source file is the same inode; return the rest.

    uv hardlinks every installed file out of its cache, so two venvs holding the same
    distribution share each source file's inode, and a .pyc compiled for one (it records
    the source's mtime and size) is valid for the other. A numpy is compiled once per home.
    """
    donors = [
        next(sibling.glob("lib/*/site-packages"), None)
        for sibling in sorted(venv.parent.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        if sibling != venv and (sibling / READY_FILE).exists()
    ][:8]
    left = []
    for path in missing:
        relative = os.path.relpath(path, site_packages)
        folder, name = os.path.split(relative)
        cached = os.path.join(folder, "__pycache__", name[:-3] + tag)
        source = os.stat(path)
        for donor in donors:
            if donor is None:
                continue
            try:
                theirs = os.stat(donor / relative)
                if (theirs.st_ino, theirs.st_dev) != (source.st_ino, source.st_dev):
                    continue
                os.makedirs(site_packages / folder / "__pycache__", exist_ok=True)
                os.link(donor / cached, site_packages / cached)
                break
            except OSError:
                continue
        else:
            left.append(path)
    return left


def _finish(tmp: Path, final: Path, ready: dict[str, object]) -> None:
    """Mark ``tmp`` complete and rename it to ``final``; the loser of a rename race drops its copy."""
    (tmp / READY_FILE).write_text(json.dumps({**ready, "created": time.time()}))
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / READY_FILE).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _run(uv: Uv, args: list[str], wheel: PluginWheel) -> None:
    result = uv.run(args, plugin=wheel.slug)
    if result.returncode != 0:
        raise EnvironmentBuildError(wheel.slug, f"uv failed building its venv:\n{uv_message(result)}")


def install_shared(wheel: PluginWheel, platform: PlatformEnv, uv: Uv, *, constrained: bool) -> None:
    """Install the wheel into the platform's environment, then ``uv pip check``.

    ``constrained`` pins every installed distribution (what the check verified); a
    forced plugin is installed as it is. On any failure the environment is put back as
    it was: what the install added is removed and what it changed is reinstalled at
    its old version.
    """
    with tempfile.TemporaryDirectory(prefix="mint-shared-") as tmp:
        requirements = Path(tmp, "requirements.txt")
        requirements.write_text(wheel.requirement_line() + "\n")
        args = ["pip", "install", "--quiet", "--compile-bytecode", "--python", platform.python, *uv.sources.args()]
        if constrained:
            pins = Path(tmp, "pins.txt")
            pins.write_text(platform.pins(excluding=frozenset({wheel.name})))
            args += ["-c", str(pins)]
        result = uv.run([*args, "-r", str(requirements)], plugin=wheel.slug)
        if result.returncode != 0:
            restore_platform(platform, uv, plugin=wheel.slug)
            raise PlatformEnvError(wheel.slug, f"cannot install into the platform's environment:\n{uv_message(result)}")
        check = uv.run(["pip", "check", "--python", platform.python], plugin=wheel.slug)
        if check.returncode != 0:
            restore_platform(platform, uv, plugin=wheel.slug)
            problem = "\n".join(part for part in (check.stdout.strip(), uv_message(check)) if part)
            raise PlatformEnvError(
                wheel.slug, f"uv pip check failed after installing it; the install was undone:\n{problem}"
            )


def restore_platform(before: PlatformEnv, uv: Uv, *, plugin: str) -> None:
    """Put the platform's environment back to ``before``: remove additions, reinstall old versions."""
    from .platform import inspect_platform

    now = inspect_platform(before.python)
    added = sorted(set(now.dists) - set(before.dists))
    if added:
        uv.run(["pip", "uninstall", "--quiet", "--python", before.python, *added], plugin=plugin)
    changed = [
        name for name in before.dists if name in now.dists and now.dists[name].version != before.dists[name].version
    ]
    if changed:
        with tempfile.TemporaryDirectory(prefix="mint-restore-") as tmp:
            old = Path(tmp, "restore.txt")
            old.write_text("".join(f"{name}=={before.dists[name].version}\n" for name in changed))
            uv.run(
                ["pip", "install", "--quiet", "--python", before.python, *uv.sources.args(), "-r", str(old)],
                plugin=plugin,
            )


def uninstall_shared(name: str, platform: PlatformEnv, uv: Uv, *, plugin: str) -> None:
    """Remove a plugin's own distribution from the platform's environment (it moved to a venv)."""
    uv.run(["pip", "uninstall", "--quiet", "--python", platform.python, name], plugin=plugin)
