"""The decision for one plugin: shared or isolated, whether it was forced, and why."""

import time
from dataclasses import dataclass
from typing import Any, Literal

from ._uv import Uv
from .conflict import stage1, stage2
from .overrides import Overrides
from .platform import InstalledDist, PlatformEnv
from .wheels import PluginWheel

Mode = Literal["shared", "isolated"]


@dataclass(frozen=True)
class Decision:
    """Where a plugin runs. ``clashes`` names every clash in words; ``reason`` says how it was decided."""

    plugin: str
    mode: Mode
    forced: bool
    clashes: tuple[str, ...]
    reason: str
    wheel: PluginWheel
    would_install: tuple[InstalledDist, ...] = ()
    seconds: tuple[float, float] = (0.0, 0.0)  # stage 1, stage 2

    def to_json(self) -> dict[str, Any]:
        """``plugin``, ``mode``, ``forced``, ``clashes`` (and ``reason``), as ``plan --json`` prints."""
        return {
            "plugin": self.plugin,
            "mode": self.mode,
            "forced": self.forced,
            "clashes": list(self.clashes),
            "reason": self.reason,
        }


def decide(wheel: PluginWheel, platform: PlatformEnv, uv: Uv, overrides: Overrides | None = None) -> Decision:
    """Decide one plugin against ``platform`` (which already includes plugins shared before it)."""
    forced = (overrides or Overrides()).mode_for(wheel.slug)
    if forced == "isolated":
        return Decision(wheel.slug, "isolated", True, (), "forceIsolated: the conflict check was skipped", wheel)
    if forced == "shared":
        return Decision(wheel.slug, "shared", True, (), "forceShared: the conflict check was skipped", wheel)
    started = time.perf_counter()
    first = stage1(wheel, platform)
    after_stage1 = time.perf_counter()
    if first.clashes:
        return Decision(
            wheel.slug, "isolated", False, first.clashes, "stage 1: a direct requirement excludes an installed version",
            wheel, seconds=(after_stage1 - started, 0.0),
        )  # fmt: skip
    second = stage2(wheel, platform, uv)
    seconds = (after_stage1 - started, time.perf_counter() - after_stage1)
    if second.clashes:
        return Decision(
            wheel.slug, "isolated", False, second.clashes, "stage 2: it does not resolve with the platform kept",
            wheel, seconds=seconds,
        )  # fmt: skip
    return Decision(
        wheel.slug, "shared", False, (), "no clash: it resolves with every installed version kept",
        wheel, second.would_install, seconds,
    )  # fmt: skip
