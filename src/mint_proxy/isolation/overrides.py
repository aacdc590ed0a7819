"""``forceIsolated`` / ``forceShared``: the design page's JSON, read as written.

{"plugins": {"forceIsolated": ["my-plugin-slug"], "forceShared": ["other-slug"]}}
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..plugins.spec import check_slug
from .errors import OverridesError

_KEYS = ("forceIsolated", "forceShared")


@dataclass(frozen=True)
class Overrides:
    """Plugins whose mode is chosen by hand. A slug may not be in both sets."""

    force_isolated: frozenset[str] = frozenset()
    force_shared: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if both := sorted(self.force_isolated & self.force_shared):
            raise OverridesError("", f"{', '.join(both)} is in both forceIsolated and forceShared: choose one")

    @classmethod
    def from_json(cls, data: object, *, source: str = "overrides") -> "Overrides":
        """Build from the parsed JSON; errors name ``source``, the key and the problem."""
        if not isinstance(data, Mapping) or set(data) - {"plugins"}:
            raise OverridesError(
                "", f'{source}: expected {{"plugins": {{"forceIsolated": [...], "forceShared": [...]}}}}'
            )
        plugins: Any = data.get("plugins", {})
        if not isinstance(plugins, Mapping):
            raise OverridesError("", f"{source}: key 'plugins' must be an object")
        if unknown := sorted(set(plugins) - set(_KEYS)):
            raise OverridesError(
                "", f"{source}: unknown key 'plugins.{unknown[0]}' (allowed: forceIsolated, forceShared)"
            )
        sets = {key: _slugs(plugins.get(key, []), f"{source}: key 'plugins.{key}'") for key in _KEYS}
        try:
            return cls(sets["forceIsolated"], sets["forceShared"])
        except OverridesError as exc:
            raise OverridesError("", f"{source}: {exc}") from None

    def mode_for(self, slug: str) -> str | None:
        """``"isolated"``, ``"shared"`` or ``None`` (decided by the check)."""
        if slug in self.force_isolated:
            return "isolated"
        if slug in self.force_shared:
            return "shared"
        return None


def _slugs(value: object, where: str) -> frozenset[str]:
    if not isinstance(value, list):
        raise OverridesError("", f"{where} must be a list of plugin slugs")
    slugs: list[str] = []
    for item in value:
        try:
            slugs.append(check_slug(item))
        except ValueError as exc:
            raise OverridesError("", f"{where}: {exc}") from None
    return frozenset(slugs)


def load_overrides(path: str | Path) -> Overrides:
    """Read the overrides JSON file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise OverridesError("", f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OverridesError("", f"{path}: not valid JSON: {exc}") from None
    return Overrides.from_json(data, source=str(path))
