"""What a supervised plugin is (``PluginSpec``) and what the supervisor reports (``PluginStatus``).

Plain data, no I/O. The TOML parser (``devconfig``), ``mint-proxy install`` and
Python callers all build the same ``PluginSpec``; the supervisor, every worker's
state watcher, the admin views and the metrics all read the same ``PluginStatus``
(the supervisor writes them, one per plugin, to ``<runtime_dir>/state.json``).

A plugin's endpoint is a pure function of its spec and the runtime dir:
``<runtime_dir>/<slug>.sock``. So every platform worker computes the same route
without being told.
"""

import enum
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..routing import _check_prefix

DEFAULT_STARTUP_TIMEOUT = 60.0  # scientific stacks import slowly
DEFAULT_STOP_TIMEOUT = 10.0

# A slug is a plugin's name in URLs, file names, loggers and metric labels: lowercase
# letters, digits, '-' and '_', starting with a letter or digit, at most 64 characters.
_SLUG = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def check_slug(slug: object) -> str:
    """Return ``slug`` if it is a valid plugin name; raise ``ValueError`` saying why not."""
    if not isinstance(slug, str) or not _SLUG.fullmatch(slug):
        raise ValueError(
            f"plugin name {slug!r} is not valid: use 1-64 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return slug


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When a plugin that exited unasked is started again.

    Every exit the supervisor did not ask for is a crash, exit code 0 included.
    The n-th consecutive restart waits ``uniform(0, min(backoff_max, backoff_initial * 2**n))``
    (exponential backoff with full jitter). The count resets once the plugin has
    stayed READY for ``stable_after`` seconds. ``crash_limit`` crashes within
    ``crash_window`` seconds make the plugin FATAL: it stays down until restarted by hand.
    """

    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    stable_after: float = 60.0
    crash_limit: int = 5
    crash_window: float = 300.0


@dataclass(frozen=True, slots=True)
class PluginSpec:
    """How to run one isolated plugin.

    Exactly one of ``app`` (an ASGI import string served by the bundled plugin host
    under ``python``, default: the current interpreter) or ``command`` (argv, or a
    string split with ``shlex``; ``{socket}`` and ``{port}`` are replaced) is given.
    ``env`` is added to a minimal clean environment: the platform's own variables and
    secrets never reach a plugin. ``route_options`` are passed to the plugin's
    ``Route`` (``read_timeout``, ``max_body_bytes``, ``strip_prefix``, ...).
    """

    slug: str
    prefix: str = ""
    app: str | None = None
    python: str | None = None
    command: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
    health_path: str | None = None
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    route_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_slug(self.slug)
        if not self.prefix:
            object.__setattr__(self, "prefix", "/" + self.slug)
        command: object = self.command
        if isinstance(command, str):
            command = tuple(shlex.split(command))
        elif command is not None:
            if not isinstance(command, Sequence) or not all(isinstance(part, str) for part in command):
                raise TypeError("command must be a string or a list of strings")
            command = tuple(command)
        object.__setattr__(self, "command", command)
        if (self.app is None) == (command is None):
            raise ValueError(f"plugin {self.slug!r}: give exactly one of 'app' or 'command'")
        if command is not None and not command:
            raise ValueError(f"plugin {self.slug!r}: 'command' is empty")
        for name in ("startup_timeout", "stop_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"plugin {self.slug!r}: {name} must be a positive number of seconds")
        if self.health_path is not None and not self.health_path.startswith("/"):
            raise ValueError(f"plugin {self.slug!r}: health_path must start with '/'")

    def socket_path(self, runtime_dir: str | os.PathLike[str]) -> str:
        """The Unix socket this plugin listens on: ``<runtime_dir>/<slug>.sock``."""
        return os.path.join(os.fspath(runtime_dir), f"{self.slug}.sock")


@dataclass(frozen=True, slots=True)
class SharedPlugin:
    """A plugin the platform mounts in-process (shared mode): its slug, ASGI app and prefix.

    ``app`` is the ASGI app itself or an import string (``"peak_picking:app"``, what a
    ``[shared."/prefix"]`` table holds); ``SharedPluginsMiddleware`` imports it when it is
    built, in the platform's process. ``prefix`` defaults to ``/<slug>``, under the mount path.
    """

    slug: str
    app: Any
    prefix: str = ""
    strip_prefix: bool = False

    def __post_init__(self) -> None:
        check_slug(self.slug)
        object.__setattr__(self, "prefix", _check_prefix(self.prefix or f"/{self.slug}"))
        if not (isinstance(self.app, str) and self.app) and not callable(self.app):
            raise TypeError(f"plugin {self.slug!r}: app must be an ASGI app or an import string 'module:attr'")


class PluginState(enum.StrEnum):
    STARTING = "STARTING"
    READY = "READY"
    BACKOFF = "BACKOFF"
    FATAL = "FATAL"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"


# A request to a plugin in one of these states is answered 503 plugin_unavailable at once.
UNAVAILABLE_STATES = frozenset({PluginState.BACKOFF, PluginState.FATAL, PluginState.STOPPED})


@dataclass(frozen=True, slots=True)
class PluginStatus:
    """One plugin as the supervisor last saw it; ``state.json`` holds one per slug.

    ``since`` is a wall-clock epoch (other processes read it); ``last_exit`` reads
    ``"exit 1"`` or ``"signal SIGKILL"``; ``start_seconds`` is the last start-to-READY
    time; ``retry_after`` is the seconds until the next start attempt (BACKOFF) or None.
    """

    slug: str
    prefix: str
    state: PluginState
    endpoint: str
    pid: int | None = None
    restarts: int = 0
    last_exit: str | None = None
    since: float = 0.0
    start_seconds: float | None = None
    retry_after: float | None = None
    log_tail: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "slug": self.slug,
            "prefix": self.prefix,
            "state": str(self.state),
            "endpoint": self.endpoint,
            "pid": self.pid,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "since": self.since,
            "start_seconds": self.start_seconds,
            "retry_after": self.retry_after,
            "log_tail": list(self.log_tail),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "PluginStatus":
        return cls(
            slug=str(data["slug"]),
            prefix=str(data["prefix"]),
            state=PluginState(data["state"]),
            endpoint=str(data["endpoint"]),
            pid=data.get("pid"),
            restarts=int(data.get("restarts", 0)),
            last_exit=data.get("last_exit"),
            since=float(data.get("since", 0.0)),
            start_seconds=data.get("start_seconds"),
            retry_after=data.get("retry_after"),
            log_tail=tuple(data.get("log_tail", ())),
        )
