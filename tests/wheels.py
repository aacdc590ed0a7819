"""Small real wheels, written by hand, and a local wheelhouse for offline installs.

``make_wheel`` writes a PEP 427 wheel (METADATA, WHEEL, RECORD with hashes, optional
entry points and modules); ``repack`` turns an installed pure-Python distribution of
the test runner into a wheel, so a plugin venv can get uvicorn and httpx with no network.
"""

import base64
import hashlib
import importlib.metadata
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

_WHEEL_FILE = "Wheel-Version: 1.0\nGenerator: mint-proxy-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _write(path: Path, files: Mapping[str, bytes], dist_info: str) -> Path:
    record = [_record_line(name, data) for name, data in files.items()]
    record.append(f"{dist_info}/RECORD,,")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return path


def make_wheel(
    wheelhouse: Path,
    name: str,
    version: str,
    requires: Iterable[str] = (),
    *,
    extras: Iterable[str] = (),
    requires_python: str | None = None,
    plugin: tuple[str, str] | None = None,
    modules: Mapping[str, str] | None = None,
    metadata: str | None = None,
) -> Path:
    """Write ``name-version-py3-none-any.whl`` into ``wheelhouse`` and return its path.

    ``plugin`` = (slug, "module:attr") adds a ``[mint.plugins]`` entry point;
    ``modules`` maps file names inside the wheel to their source;
    ``metadata`` replaces the METADATA text (to write a broken one).
    """
    stem = re.sub(r"[-_.]+", "_", name).lower()
    dist_info = f"{stem}-{version}.dist-info"
    if metadata is None:
        lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        if requires_python:
            lines.append(f"Requires-Python: {requires_python}")
        lines += [f"Provides-Extra: {extra}" for extra in extras]
        lines += [f"Requires-Dist: {requirement}" for requirement in requires]
        metadata = "\n".join(lines) + "\n"
    files: dict[str, bytes] = {f"{dist_info}/METADATA": metadata.encode(), f"{dist_info}/WHEEL": _WHEEL_FILE.encode()}
    if plugin is not None:
        files[f"{dist_info}/entry_points.txt"] = f"[mint.plugins]\n{plugin[0]} = {plugin[1]}\n".encode()
    for module, source in (modules or {}).items():
        files[module] = source.encode()
    wheelhouse.mkdir(parents=True, exist_ok=True)
    return _write(wheelhouse / f"{stem}-{version}-py3-none-any.whl", files, dist_info)


def repack(wheelhouse: Path, dist_name: str) -> Path:
    """Rebuild an installed pure-Python distribution of this interpreter as a wheel."""
    dist = importlib.metadata.distribution(dist_name)
    version = dist.version
    stem = re.sub(r"[-_.]+", "_", dist.metadata["Name"]).lower()
    files: dict[str, bytes] = {}
    dist_info = ""
    for entry in dist.files or ():
        parts = entry.parts
        if parts[0] in ("..", "__pycache__") or "__pycache__" in parts or entry.name in ("RECORD", "INSTALLER"):
            continue
        if entry.name == "direct_url.json" or entry.name == "REQUESTED":
            continue
        if parts[0].endswith(".dist-info"):
            dist_info = parts[0]
        files[entry.as_posix()] = Path(str(dist.locate_file(entry))).read_bytes()
    wheelhouse.mkdir(parents=True, exist_ok=True)
    return _write(wheelhouse / f"{stem}-{version}-py3-none-any.whl", files, dist_info)
