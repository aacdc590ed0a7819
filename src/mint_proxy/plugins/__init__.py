"""Running isolated plugins: specs, the supervisor, and the runtime directory they share."""

from .spec import PluginSpec, PluginState, PluginStatus, RestartPolicy

__all__ = ["PluginSpec", "PluginState", "PluginStatus", "RestartPolicy"]
