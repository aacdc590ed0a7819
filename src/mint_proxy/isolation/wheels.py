"""A plugin wheel's metadata: name, version, requirements, extras and its ASGI app.

A plugin declares its app with an entry point in the ``mint.plugins`` group; the entry
point's name is the plugin's slug::

    [project.entry-points."mint.plugins"]
    peak-picking = "peak_picking.app:app"

A wheel without one is named by its distribution (canonicalised, e.g. ``Peak_Picking`` →
``peak-picking``); it can be planned, but not installed, since there is no app to run.
"""

import configparser
import hashlib
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.metadata import InvalidMetadata, Metadata
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

from ..plugins.spec import check_slug
from .errors import InvalidPluginName, WheelError

ENTRY_POINT_GROUP = "mint.plugins"
_EXTRAS = re.compile(r"^(?P<path>.+?)\[(?P<extras>[^\[\]]*)\]$")


@dataclass(frozen=True)
class PluginWheel:
    """What the conflict check and the installer need to know about one plugin wheel."""

    path: Path
    slug: str
    name: NormalizedName
    version: Version
    requires: tuple[Requirement, ...]
    extras: frozenset[NormalizedName]
    app: str | None
    sha256: str

    def requirement_line(self) -> str:
        """The wheel as a requirement for uv: ``name[extras] @ file:///...``."""
        extras = f"[{','.join(sorted(self.extras))}]" if self.extras else ""
        return f"{self.name}{extras} @ {self.path.resolve().as_uri()}"


def split_extras(argument: str) -> tuple[str, frozenset[NormalizedName]]:
    """``dist/x.whl[gpu,io]`` → ``("dist/x.whl", {"gpu", "io"})``."""
    match = _EXTRAS.match(argument)
    if not match:
        return argument, frozenset()
    extras = frozenset(canonicalize_name(extra) for extra in match["extras"].split(",") if extra.strip())
    return match["path"], extras


def read_wheel(argument: str | Path, extras: frozenset[str] = frozenset()) -> PluginWheel:
    """Read a wheel file (``path`` or ``path[extra,...]``) into a ``PluginWheel``.

    Raises ``WheelError`` for a missing file, a file that is not a wheel, or metadata
    that does not parse or validate, and ``InvalidPluginName`` for a bad slug.
    """
    text, parsed_extras = split_extras(str(argument))
    path = Path(text)
    label = path.name
    try:
        data = path.read_bytes()
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            dist_infos = {name.split("/", 1)[0] for name in names if name.split("/", 1)[0].endswith(".dist-info")}
            if len(dist_infos) != 1:
                raise WheelError(
                    label, f"{path} is not a wheel: expected one .dist-info directory, found {len(dist_infos)}"
                )
            dist_info = dist_infos.pop()
            try:
                raw_metadata = archive.read(f"{dist_info}/METADATA")
            except KeyError:
                raise WheelError(label, f"{path} has no {dist_info}/METADATA") from None
            entry_points = (
                archive.read(f"{dist_info}/entry_points.txt").decode("utf-8", "replace")
                if f"{dist_info}/entry_points.txt" in names
                else ""
            )
    except FileNotFoundError:
        raise WheelError(label, f"{path} does not exist") from None
    except IsADirectoryError:
        raise WheelError(label, f"{path} is a directory, not a wheel") from None
    except zipfile.BadZipFile:
        raise WheelError(label, f"{path} is not a wheel (not a zip archive)") from None
    try:
        metadata = Metadata.from_email(raw_metadata, validate=True)
    except (InvalidMetadata, ExceptionGroup) as exc:
        raise WheelError(label, f"{path} has broken metadata: {_metadata_problem(exc)}") from None
    name = canonicalize_name(metadata.name)
    slug, app = _entry_point(entry_points, name, label)
    try:
        check_slug(slug)
    except ValueError as exc:
        raise InvalidPluginName(slug, str(exc)) from None
    provided = frozenset(canonicalize_name(extra) for extra in metadata.provides_extra or ())
    wanted = frozenset(canonicalize_name(extra) for extra in extras) | parsed_extras
    if unknown := sorted(wanted - provided):
        raise WheelError(
            slug, f"{path} has no extra {', '.join(unknown)} (it provides: {', '.join(sorted(provided)) or 'none'})"
        )
    return PluginWheel(
        path=path,
        slug=slug,
        name=name,
        version=metadata.version,
        requires=tuple(metadata.requires_dist or ()),
        extras=wanted,
        app=app,
        sha256=hashlib.sha256(data).hexdigest(),
    )


def _metadata_problem(exc: BaseException) -> str:
    if isinstance(exc, ExceptionGroup):
        return "; ".join(_metadata_problem(inner) for inner in exc.exceptions)
    return str(exc)


def _entry_point(text: str, name: NormalizedName, label: str) -> tuple[str, str | None]:
    if not text:
        return name, None
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text)
    except configparser.Error as exc:
        raise WheelError(label, f"entry_points.txt does not parse: {exc}") from None
    if not parser.has_section(ENTRY_POINT_GROUP):
        return name, None
    entries = list(parser.items(ENTRY_POINT_GROUP))
    if len(entries) != 1:
        raise WheelError(label, f"declares {len(entries)} [{ENTRY_POINT_GROUP}] entry points; a wheel is one plugin")
    slug, app = entries[0]
    return slug.strip(), app.strip()
