"""The platform's environment as seen by its own interpreter: marker values and installed distributions.

The interpreter is run once (``python -I -c ...``) with a stdlib-only script, so the
platform's environment need not contain ``packaging``. The marker values are computed
as ``packaging.markers.default_environment()`` does.
"""

import json
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

from .errors import PlatformEnvError

_INSPECT = r"""
import importlib.metadata, json, os, platform, sys
def _version(info):
    text = f"{info.major}.{info.minor}.{info.micro}"
    if info.releaselevel != "final":
        text += info.releaselevel[0] + str(info.serial)
    return text
markers = {
    "implementation_name": sys.implementation.name,
    "implementation_version": _version(sys.implementation.version),
    "os_name": os.name,
    "platform_machine": platform.machine(),
    "platform_release": platform.release(),
    "platform_system": platform.system(),
    "platform_version": platform.version(),
    "python_full_version": platform.python_version(),
    "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]),
    "sys_platform": sys.platform,
}
dists, seen = [], set()
for dist in importlib.metadata.distributions():
    name = dist.metadata["Name"]
    key = (name or "").lower().replace("_", "-").replace(".", "-")
    if not name or key in seen:
        continue
    seen.add(key)
    dists.append({"name": name, "version": dist.version, "requires": dist.requires or []})
print(json.dumps({
    "markers": markers, "dists": dists, "executable": sys.executable, "prefix": sys.prefix,
    "version": sys.version, "cache_tag": sys.implementation.cache_tag,
}))
"""


@dataclass(frozen=True)
class InstalledDist:
    """One distribution installed in the platform's environment (or a shared plugin planned into it)."""

    name: str
    version: str
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlatformEnv:
    """The platform's interpreter, its marker values and what is installed in it."""

    python: str
    markers: dict[str, str]
    dists: dict[NormalizedName, InstalledDist]
    identity: str = ""
    prefix: str = ""
    cache_tag: str = ""
    planned: frozenset[NormalizedName] = field(default_factory=frozenset)

    def requirements_on(self, name: NormalizedName, *, excluding: frozenset[NormalizedName]) -> list[str]:
        """``"mint-platform needs numpy<2"`` for every installed dist that requires ``name``."""
        needs: list[str] = []
        for key, dist in sorted(self.dists.items()):
            if key in excluding:
                continue
            for line in dist.requires:
                try:
                    requirement = Requirement(line)
                except ValueError:
                    continue
                if canonicalize_name(requirement.name) != name or not requirement.specifier:
                    continue
                if requirement.marker is not None and not requirement.marker.evaluate({**self.markers, "extra": ""}):
                    continue
                needs.append(f"{dist.name} needs {requirement.name}{requirement.specifier or ''}")
        return needs

    def with_planned(self, dists: list[InstalledDist]) -> "PlatformEnv":
        """This environment plus distributions a shared plugin earlier in the same plan will bring."""
        added = {canonicalize_name(dist.name): dist for dist in dists}
        return replace(self, dists={**self.dists, **added}, planned=self.planned | added.keys())

    def pins(self, *, excluding: frozenset[NormalizedName]) -> str:
        """A constraints file pinning every installed distribution to its version."""
        lines = []
        for key, dist in sorted(self.dists.items()):
            if key in excluding:
                continue
            lines.append(f"{key}=={dist.version}" if _is_pep440(dist.version) else f"{key}==={dist.version}")
        return "\n".join(lines) + "\n"


def _is_pep440(version: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        Version(version)
    except InvalidVersion:
        return False
    return True


def inspect_platform(python: str | Path | None = None) -> PlatformEnv:
    """Run ``python`` (default: this interpreter) once and read its environment."""
    executable = str(python) if python is not None else sys.executable
    try:
        result = subprocess.run(
            [executable, "-I", "-c", _INSPECT], capture_output=True, text=True, check=False, timeout=60
        )
    except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
        raise PlatformEnvError("", f"cannot run the platform interpreter {executable}: {exc.strerror}") from None
    except subprocess.TimeoutExpired:
        raise PlatformEnvError("", f"the platform interpreter {executable} did not answer within 60 s") from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise PlatformEnvError("", f"cannot inspect the platform interpreter {executable}: {last}")
    data = json.loads(result.stdout)
    dists = {
        canonicalize_name(item["name"]): InstalledDist(item["name"], item["version"], tuple(item["requires"]))
        for item in data["dists"]
    }
    identity = f"{Path(data['executable']).resolve()}|{data['version']}|{data['cache_tag']}"
    return PlatformEnv(
        python=executable,
        markers=data["markers"],
        dists=dists,
        identity=identity,
        prefix=data["prefix"],
        cache_tag=data["cache_tag"],
    )
