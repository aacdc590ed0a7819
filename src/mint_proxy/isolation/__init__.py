"""Shared or isolated: the install-time conflict check, uv-managed plugin venvs, in-process mounting.

    from mint_proxy.isolation import install, plan

    decisions = plan(["dist/peak_picking-1.0-py3-none-any.whl"], find_links=["wheelhouse"])
    install(["dist/peak_picking-1.0-py3-none-any.whl"], config="plugins.toml", find_links=["wheelhouse"])

Needs the ``isolation`` extra (``packaging``, ``uv``, ``httpx``). Importing this package
imports none of them: each name loads its module on first use, so ``mint-proxy`` keeps
working without the extra.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .decision import Decision as Decision
    from .envs import PluginEnv as PluginEnv, provision as provision
    from .errors import (
        EnvironmentBuildError as EnvironmentBuildError,
        InstallError as InstallError,
        InvalidPluginName as InvalidPluginName,
        OverridesError as OverridesError,
        PlatformEnvError as PlatformEnvError,
        UnsatisfiableRequirement as UnsatisfiableRequirement,
        UvMissing as UvMissing,
        WheelError as WheelError,
    )
    from .flow import Installed as Installed, install as install, plan as plan, recheck as recheck
    from .mount import (
        SharedPlugin as SharedPlugin,
        SharedPluginImportError as SharedPluginImportError,
        SharedPluginsMiddleware as SharedPluginsMiddleware,
    )
    from .overrides import Overrides as Overrides, load_overrides as load_overrides
    from .platform import PlatformEnv as PlatformEnv, inspect_platform as inspect_platform
    from .wheels import PluginWheel as PluginWheel, read_wheel as read_wheel

_WHERE = {
    "Decision": "decision",
    "EnvironmentBuildError": "errors",
    "InstallError": "errors",
    "Installed": "flow",
    "InvalidPluginName": "errors",
    "Overrides": "overrides",
    "OverridesError": "errors",
    "PlatformEnv": "platform",
    "PlatformEnvError": "errors",
    "PluginEnv": "envs",
    "PluginWheel": "wheels",
    "SharedPlugin": "mount",
    "SharedPluginImportError": "mount",
    "SharedPluginsMiddleware": "mount",
    "UnsatisfiableRequirement": "errors",
    "UvMissing": "errors",
    "WheelError": "errors",
    "inspect_platform": "platform",
    "install": "flow",
    "load_overrides": "overrides",
    "plan": "flow",
    "provision": "envs",
    "read_wheel": "wheels",
    "recheck": "flow",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
