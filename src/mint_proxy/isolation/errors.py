"""Exceptions raised while planning or installing plugins.

    MintProxyError
    └── InstallError              a plugin cannot be checked, provisioned or installed
        ├── InvalidPluginName          the slug is not a valid plugin name
        ├── WheelError                 the wheel is missing, not a wheel, or has broken metadata
        ├── OverridesError             the forceIsolated / forceShared file is invalid
        ├── UvMissing                  the uv binary cannot be found or run
        ├── PlatformEnvError           the platform's interpreter cannot be inspected or changed
        ├── UnsatisfiableRequirement   no index or wheelhouse can satisfy a requirement
        └── EnvironmentBuildError      a venv cannot be built (directory not writable, uv failed)

Every message names the plugin (or the file) and the problem. Nothing a failed step
made is left behind: callers never have to clean up after one of these.
"""

from ..errors import MintProxyError


class InstallError(MintProxyError):
    """Raised when a plugin cannot be checked, provisioned or installed; ``plugin`` names it."""

    def __init__(self, plugin: str, problem: str) -> None:
        super().__init__(f"{plugin}: {problem}" if plugin else problem)
        self.plugin = plugin
        self.problem = problem


class InvalidPluginName(InstallError):
    """Raised when a plugin's slug is not a valid name (see ``mint_proxy.plugins.spec.check_slug``)."""


class WheelError(InstallError):
    """Raised when a wheel is missing, unreadable, or its metadata is broken."""


class OverridesError(InstallError):
    """Raised when the overrides JSON is unreadable or invalid; the message names the file and key."""


class UvMissing(InstallError):
    """Raised when the uv binary is not installed or cannot be run."""


class PlatformEnvError(InstallError):
    """Raised when the platform's interpreter cannot be run, inspected or installed into."""


class UnsatisfiableRequirement(InstallError):
    """Raised when a plugin's requirements cannot be met by any available distribution."""


class EnvironmentBuildError(InstallError):
    """Raised when a plugin's venv cannot be built (directory not writable, uv failed)."""
