"""Running isolated plugins: specs, the supervisor, and the runtime directory they share."""

from ._views import status_document
from .runtime import (
    RuntimeDirError,
    StateFileError,
    SupervisorState,
    default_runtime_dir,
    ensure_runtime_dir,
    read_state,
    read_status,
    supervisor_running,
    sweep,
)
from .spec import UNAVAILABLE_STATES, PluginSpec, PluginState, PluginStatus, RestartPolicy, check_slug
from .supervisor import PluginSupervisor
from .views import PluginStatusApp

__all__ = [
    "UNAVAILABLE_STATES",
    "PluginSpec",
    "PluginState",
    "PluginStatus",
    "PluginStatusApp",
    "PluginSupervisor",
    "RestartPolicy",
    "RuntimeDirError",
    "StateFileError",
    "SupervisorState",
    "check_slug",
    "default_runtime_dir",
    "ensure_runtime_dir",
    "read_state",
    "read_status",
    "status_document",
    "supervisor_running",
    "sweep",
]
