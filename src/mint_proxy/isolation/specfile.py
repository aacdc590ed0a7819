"""Writing installed plugins into the TOML spec file the supervisor and the platform read.

Each plugin is one block between marker comments, replaced whole on reinstall; the
rest of the file (hand-written routes, settings, comments) is kept byte for byte::

    # >>> mint-proxy install: peak-picking
    [proxy."/peak-picking"]
    plugin = "peak-picking"
    app = "peak_picking:app"
    python = "/srv/mint/.mint-plugins/venvs/3f2a.../bin/python"
    # <<< mint-proxy install: peak-picking

A shared plugin gets ``[shared."/slug"]`` with ``app`` and ``plugin``. The file is
written atomically (temporary file + ``os.replace``).
"""

import fcntl
import json
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import InstallError

_BEGIN = "# >>> mint-proxy install: "
_END = "# <<< mint-proxy install: "


@dataclass(frozen=True)
class SpecEntry:
    """One installed plugin as written to the spec file."""

    slug: str
    mode: str  # "shared" or "isolated"
    app: str
    python: str | None = None

    def block(self) -> str:
        table = "proxy" if self.mode == "isolated" else "shared"
        lines = [f"{_BEGIN}{self.slug}", f"[{table}.{_quote('/' + self.slug)}]"]
        lines += [f"plugin = {_quote(self.slug)}", f"app = {_quote(self.app)}"]
        if self.python is not None:
            lines.append(f"python = {_quote(self.python)}")
        lines.append(f"{_END}{self.slug}")
        return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid TOML basic string


def _block_pattern(slug: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(_BEGIN + slug)}\n.*?^{re.escape(_END + slug)}\n?", re.M | re.S)


def managed_entries(path: Path) -> dict[str, str]:
    """slug → mode of the plugins the installer wrote into ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    entries = {}
    for match in re.finditer(rf"^{re.escape(_BEGIN)}(\S+)\n\[(proxy|shared)\.", text, re.M):
        entries[match[1]] = "isolated" if match[2] == "proxy" else "shared"
    return entries


def update_spec_file(path: Path, entries: list[SpecEntry]) -> None:
    """Replace or append the blocks of ``entries`` in ``path`` (created if missing).

    Two installs at once each hold ``.<name>.lock`` beside the file for their
    read-modify-write, so neither loses the other's block.
    """
    try:
        lock = open(path.parent / f".{path.name}.lock", "a+b")
    except OSError as exc:
        raise InstallError("", f"{path}: cannot lock the spec file: {exc.strerror}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _update(path, entries)


def _update(path: Path, entries: list[SpecEntry]) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise InstallError("", f"{path}: cannot read the spec file: {exc.strerror}") from None
    for entry in entries:
        text = _block_pattern(entry.slug).sub("", text)
    try:
        existing = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InstallError("", f"{path}: not valid TOML, left unchanged: {exc}") from None
    for entry in entries:
        prefix = "/" + entry.slug
        for table in ("proxy", "shared"):
            if prefix in existing.get(table, {}):
                raise InstallError(
                    entry.slug, f'{path}: key {table}."{prefix}" is already defined by hand; remove it to install'
                )
    text = text.rstrip("\n") + "\n" if text.strip() else ""
    text += "".join(("\n" if text else "") + entry.block() for entry in entries) if entries else ""
    try:
        tomllib.loads(text)  # never write a file the parser would refuse
    except tomllib.TOMLDecodeError as exc:  # e.g. routes written as an inline table: `proxy = {...}`
        slugs = ", ".join(entry.slug for entry in entries)
        raise InstallError(
            slugs,
            f"{path}: cannot add its table ({exc}); an inline table such as 'proxy = {{...}}' cannot be "
            "extended: write it as a [proxy] table. The file is unchanged",
        ) from None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
