"""Development config: ``config.dev.toml`` parsed into the production ``RouteTable``.

    config = load_dev_config(config_path_from_environ(os.environ))
    watcher = ConfigWatcher(config.path, config.routes)

This is the only module that reads files or the environment. It never validates
a route itself: each entry becomes ``Route(...)`` and the set becomes
``RouteTable(...)``, exactly as the platform builds them in production, and any
``ValueError``/``TypeError`` they raise comes back as ``DevConfigError``. This
module only checks the TOML shape: known tables and keys, and each value's TOML
type (so ``plugin = false`` cannot silently fall back to the default).

Every error message reads ``{file}: {key}: {problem}``, where ``{key}`` is the
TOML key path, e.g. ``config.dev.toml: [proxy."/peak"].url: upstream URL ...``.
A missing or empty ``[proxy]`` table is allowed and gives an empty table.

A table-form route with ``app`` or ``command`` is a supervised plugin: it becomes a
``PluginSpec`` and a route to ``unix:<runtime_dir>/<slug>.sock`` (``plugins.spec``),
so every worker computes the same route. ``[shared."/prefix"]`` lists plugins the
platform mounts in-process; the proxy does not route them.
"""

import asyncio
import difflib
import json
import logging
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from .errors import DevConfigError
from .plugins.spec import PluginSpec, RestartPolicy, SharedPlugin, check_slug
from .routing import DEFAULT_RETRY_WINDOW, Route, RouteTable, Upstream, check_mount_path, seconds

CONFIG_ENV = "MINT_PROXY_CONFIG"
SECRET_ENV = "MINT_INTERNAL_TOKEN_SECRET"
KID_ENV = "MINT_INTERNAL_TOKEN_KID"
RUNTIME_DIR_ENV = "MINT_PROXY_RUNTIME_DIR"
DEFAULT_CONFIG_PATH = "config.dev.toml"
DEFAULT_ADMIN_PATH = "/_mint"
LOG_FORMAT_ENV = "MINT_PROXY_LOG_FORMAT"

# Route-table key -> (accepted TOML types, how to say it). Only types: values are Route's business.
_ROUTE_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "url": ((str,), 'a string like "http://127.0.0.1:8005" or "unix:/path.sock"'),
    "plugin": ((str,), "a string"),
    "strip_prefix": ((bool,), "true or false"),
    "connect_timeout": ((int, float), "a number of seconds"),
    "read_timeout": ((int, float), "a number of seconds"),
    "max_body_bytes": ((int,), "an integer number of bytes"),
    "max_message_bytes": ((int,), "an integer number of bytes"),
}
# Keys that make a table-form route a supervised plugin (the route keys above, except url, apply too).
_NUMBER = ((int, float), "a number of seconds")
_PLUGIN_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "app": ((str,), 'an ASGI import string like "peak_picking.app:app"'),
    "python": ((str,), "a path to a Python interpreter"),
    "command": ((str, list), 'a command line: a string or an array of strings, with "{socket}" or "{port}"'),
    "env": ((dict,), "a table of strings"),
    "cwd": ((str,), "a directory path"),
    "startup_timeout": _NUMBER,
    "health_path": ((str,), 'a path like "/healthz"'),
    "stop_timeout": _NUMBER,
    "backoff_initial": _NUMBER,
    "backoff_max": _NUMBER,
    "stable_after": _NUMBER,
    "crash_limit": ((int,), "a positive integer"),
    "crash_window": _NUMBER,
}
_RESTART_KEYS = ("backoff_initial", "backoff_max", "stable_after", "crash_limit", "crash_window")
_SHARED_KEYS = ("app", "plugin", "strip_prefix")
_SETTINGS_KEYS = ("mount_path", "retry_window", "runtime_dir", "admin_path", "metrics")
_TOP_LEVEL_KEYS = ("proxy", "settings", "shared")
# sun_path holds 108 bytes on Linux (104 on macOS), the terminating NUL included.
MAX_SOCKET_PATH_BYTES = 103 if os.uname().sysname == "Darwin" else 107
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_TYPES = {str: "a string", bool: "a boolean", int: "an integer", float: "a float", list: "an array"}


@dataclass(frozen=True)
class DevConfig:
    """What ``config.dev.toml`` describes: the routes plus proxy-wide settings.

    ``mount_path`` is where the proxy sits (``""`` or e.g. ``"/api"``), and
    ``retry_window`` is how many seconds refused connections are retried.
    ``admin_path`` is where the standalone app serves its admin views (``""``: nowhere).
    ``metrics`` says whether the standalone app counts requests (when ``prometheus_client`` is
    installed); off, nothing is counted and ``<admin_path>/metrics`` is a 404.
    """

    path: str
    routes: RouteTable
    mount_path: str = ""
    retry_window: float = DEFAULT_RETRY_WINDOW
    #: Where plugin sockets, state, the supervisor lock and a generated secret live ("" for
    #: the per-user default, resolved by ``runtime_dir_for``).
    runtime_dir: str = ""
    #: The supervised plugins (table-form routes with ``app`` or ``command``), in file order.
    plugins: tuple[PluginSpec, ...] = ()
    #: ``[shared."/prefix"]``: plugins the platform mounts in-process (``app`` is an import string).
    shared: tuple[SharedPlugin, ...] = ()
    admin_path: str = DEFAULT_ADMIN_PATH
    metrics: bool = True


def config_path_from_environ(environ: Mapping[str, str]) -> str:
    """Return ``$MINT_PROXY_CONFIG``, or ``config.dev.toml`` when it is unset or empty."""
    return environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def log_format_from_environ(environ: Mapping[str, str]) -> str:
    """Return ``$MINT_PROXY_LOG_FORMAT`` (``text`` or ``json``; default ``text``); ``DevConfigError`` otherwise."""
    value = environ.get(LOG_FORMAT_ENV) or "text"
    if value not in ("text", "json"):
        raise DevConfigError(f"{LOG_FORMAT_ENV}={value!r}: must be 'text' or 'json'", key=LOG_FORMAT_ENV)
    return value


def secret_from_environ(environ: Mapping[str, str]) -> str | None:
    """Return ``$MINT_INTERNAL_TOKEN_SECRET``, or ``None`` when it is unset or empty."""
    return environ.get(SECRET_ENV) or None


def kid_from_environ(environ: Mapping[str, str]) -> str | None:
    """Return ``$MINT_INTERNAL_TOKEN_KID`` (the ``kid`` header of minted tokens), or ``None``."""
    return environ.get(KID_ENV) or None


def runtime_dir_for(configured: str, environ: Mapping[str, str]) -> str:
    """The runtime directory: ``$MINT_PROXY_RUNTIME_DIR``, else ``configured``, else the per-user default.

    The environment wins so one config file serves several deployments on one host.
    """
    chosen = environ.get(RUNTIME_DIR_ENV) or configured
    if chosen:
        return os.path.abspath(chosen)
    from .plugins.runtime import default_runtime_dir

    return os.path.abspath(default_runtime_dir(environ))


def load_dev_config(path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None) -> DevConfig:
    """Read and parse a dev config file; raise ``DevConfigError`` naming the file on any problem.

    ``environ`` (default: none) supplies ``MINT_PROXY_RUNTIME_DIR`` and the per-user default
    runtime directory; relative ``runtime_dir``, ``cwd`` and ``python`` paths in the file are
    relative to the file's directory.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        where = "" if os.path.isabs(name) else f" (looked in {os.path.abspath(name)})"
        raise DevConfigError(f"{name}: no such file{where}; set {CONFIG_ENV} or create it", path=name) from None
    except IsADirectoryError:
        raise DevConfigError(f"{name}: is a directory; point {CONFIG_ENV} at a .toml file", path=name) from None
    except OSError as exc:
        raise DevConfigError(f"{name}: cannot read the file: {exc.strerror}", path=name) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DevConfigError(f"{name}: not UTF-8 (byte {exc.start}); save the file as UTF-8", path=name) from None
    return parse_dev_config(text, path=name, environ=environ, base_dir=os.path.dirname(os.path.abspath(name)))


def parse_dev_config(
    text: str, *, path: str = "<string>", environ: Mapping[str, str] | None = None, base_dir: str = ""
) -> DevConfig:
    """Parse config text into a ``DevConfig``; ``path`` only appears in messages.

    ``environ`` is read for ``MINT_PROXY_RUNTIME_DIR`` and the default runtime directory
    only; ``base_dir`` (default: the current directory) anchors relative paths.
    """
    environ = {} if environ is None else environ
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        hint = ""
        if str(exc).startswith(("Cannot overwrite", "Cannot declare")):
            hint = "; each key may appear once (a prefix uses either the short or the table form)"
        raise DevConfigError(f"{path}: invalid TOML: {exc}{hint}", path=path) from None
    for key, value in document.items():
        if key not in _TOP_LEVEL_KEYS:
            where = _where((key,)) if isinstance(value, dict) else _quote(key)
            _fail(
                path,
                where,
                f"unknown key{_did_you_mean(key, _TOP_LEVEL_KEYS)}; allowed top-level tables: "
                "[proxy], [settings], [shared]",
            )
    proxy = _table(path, document, "proxy")
    settings = _table(path, document, "settings")
    for key in settings:
        if key not in _SETTINGS_KEYS:
            allowed = ", ".join(_SETTINGS_KEYS)
            _fail(
                path, _where(("settings",), key), f"unknown key{_did_you_mean(key, _SETTINGS_KEYS)}; allowed: {allowed}"
            )
    base = base_dir or os.getcwd()
    configured = settings.get("runtime_dir", "")
    if not isinstance(configured, str):
        _fail(path, _where(("settings",), "runtime_dir"), f"must be a directory path string, got {_kind(configured)}")
    configured = os.path.join(base, configured) if configured else ""
    runtime_dir = runtime_dir_for(configured, environ)
    routes: list[Route] = []
    plugins: list[PluginSpec] = []
    for prefix, entry in proxy.items():
        if _is_plugin(entry):
            spec, route = _plugin(path, prefix, entry, runtime_dir, base, environ)
            plugins.append(spec)
            routes.append(route)
        else:
            routes.append(_route(path, prefix, entry))
    shared = _shared(path, _table(path, document, "shared"), proxy)
    try:
        table = RouteTable(routes)
    except (ValueError, TypeError) as exc:  # duplicates cannot survive tomllib; kept for parity's sake
        raise DevConfigError(f"{path}: [proxy]: {exc}", path=path, key="[proxy]") from exc
    mount_path = _mount_path(path, settings.get("mount_path", ""))
    admin_path = _admin_path(path, settings.get("admin_path", DEFAULT_ADMIN_PATH))
    if admin_path:
        for route in routes:
            claimed = mount_path + route.prefix
            if claimed == admin_path or claimed.startswith(admin_path + "/") or admin_path.startswith(claimed + "/"):
                _fail(
                    path,
                    _where(("proxy",), route.prefix),
                    f"the route's path {claimed!r} overlaps the admin views at {admin_path!r} "
                    "([settings] admin_path); choose another prefix, or move or empty admin_path",
                )
    return DevConfig(
        path=path,
        routes=table,
        mount_path=mount_path,
        retry_window=_retry_window(path, settings.get("retry_window", DEFAULT_RETRY_WINDOW)),
        runtime_dir=runtime_dir,
        plugins=tuple(plugins),
        shared=shared,
        admin_path=admin_path,
        metrics=_metrics(path, settings.get("metrics", True)),
    )


def _table(path: str, document: dict[str, Any], name: str) -> dict[str, Any]:
    value = document.get(name, {})
    if not isinstance(value, dict):
        _fail(path, name, f"must be a table ([{name}]), got {_kind(value)}")
    return value


def _route(path: str, prefix: str, entry: object) -> Route:
    """Turn one ``[proxy]`` entry (short or table form) into a ``Route``."""
    if isinstance(entry, str):
        return _construct(path, prefix, entry, {}, table_form=False)
    if not isinstance(entry, dict):
        problem = f'must be a URL string or a table with url = "...", got {_kind(entry)}'
        _fail(path, _where(("proxy",), prefix), problem)
    for key, value in entry.items():
        where = _where(("proxy", prefix), key)
        if key not in _ROUTE_KEYS:
            allowed = ", ".join(_ROUTE_KEYS)
            _fail(path, where, f"unknown key{_did_you_mean(key, _ROUTE_KEYS)}; allowed keys: {allowed}")
        types, expected = _ROUTE_KEYS[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            _fail(path, where, f"must be {expected}, got {_kind(value)}")
        if key == "plugin" and not value:
            _fail(path, where, "must not be empty (leave the key out for the default, the prefix without '/')")
    if "url" not in entry:
        _fail(path, _where(("proxy", prefix)), 'missing required key url; add url = "http://127.0.0.1:PORT"')
    options = {key: value for key, value in entry.items() if key != "url"}
    return _construct(path, prefix, entry["url"], options, table_form=True)


def _is_plugin(entry: object) -> bool:
    return isinstance(entry, dict) and ("app" in entry or "command" in entry)


def _plugin(
    path: str, prefix: str, entry: dict[str, Any], runtime_dir: str, base: str, environ: Mapping[str, str]
) -> tuple[PluginSpec, Route]:
    """Turn a table-form entry with ``app`` or ``command`` into a ``PluginSpec`` and its route."""
    table = ("proxy", prefix)
    for key, value in entry.items():
        where = _where(table, key)
        if key == "url":
            _fail(path, where, "a supervised plugin (app or command) listens on its own socket; remove url")
        if key in _PLUGIN_KEYS:
            types, expected = _PLUGIN_KEYS[key]
        elif key in _ROUTE_KEYS:
            types, expected = _ROUTE_KEYS[key]
        else:
            allowed = ", ".join(k for k in (*_ROUTE_KEYS, *_PLUGIN_KEYS) if k != "url")
            _fail(path, where, f"unknown key{_did_you_mean(key, (*_ROUTE_KEYS, *_PLUGIN_KEYS))}; allowed: {allowed}")
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            _fail(path, where, f"must be {expected}, got {_kind(value)}")
        if isinstance(value, str) and not value and key != "cwd":
            _fail(path, where, "must not be empty")
    if "app" in entry and "command" in entry:
        _fail(path, _where(table), "give either app (served by the plugin host) or command, not both")
    command = entry.get("command")
    if isinstance(command, list) and (not command or not all(isinstance(part, str) and part for part in command)):
        _fail(path, _where(table, "command"), "must be a non-empty array of non-empty strings")
    if command is not None and "python" in entry:
        _fail(path, _where(table, "python"), "only applies to app; a command names its own interpreter")
    env = entry.get("env", {})
    for name, value in env.items():
        if not isinstance(value, str):
            _fail(path, _where((*table, "env"), name), f"must be a string, got {_kind(value)}")
    slug = entry.get("plugin", prefix[1:])
    try:
        check_slug(slug)
    except ValueError as exc:
        named = "plugin" in entry
        hint = "" if named else '; set plugin = "a-slug" in this table'
        _fail(path, _where(table, "plugin" if named else None), f"{exc}{hint}")
    restart = _restart_policy(path, table, entry)
    options = {key: entry[key] for key in _ROUTE_KEYS if key in entry and key not in ("url", "plugin")}
    socket_path = os.path.join(runtime_dir, f"{slug}.sock")
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH_BYTES:
        source = RUNTIME_DIR_ENV if environ.get(RUNTIME_DIR_ENV) else "[settings].runtime_dir"
        _fail(
            path,
            _where(table),
            f"socket path {socket_path} is {len(os.fsencode(socket_path))} bytes, more than the "
            f"{MAX_SOCKET_PATH_BYTES} a Unix socket allows; choose a shorter {source} or plugin name",
        )
    route = _construct(path, prefix, f"unix:{socket_path}", {"plugin": slug, **options}, table_form=True)
    kwargs: dict[str, Any] = {
        key: entry[key] for key in ("app", "command", "startup_timeout", "health_path", "stop_timeout") if key in entry
    }
    for key in ("python", "cwd"):
        if key in entry:
            value = entry[key]
            # A bare interpreter name ("python3.12") is looked up on PATH; a path is relative to the file.
            relative = key == "cwd" or os.sep in value
            kwargs[key] = os.path.normpath(os.path.join(base, value)) if relative else value
    try:
        spec = PluginSpec(slug=slug, prefix=prefix, env=dict(env), restart=restart, route_options=options, **kwargs)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        culprit = next((k for k in ("startup_timeout", "stop_timeout", "health_path", "command") if k in message), None)
        _fail(path, _where(table, culprit), message.removeprefix(f"plugin {slug!r}: "))
    return spec, route


def _restart_policy(path: str, table: tuple[str, ...], entry: dict[str, Any]) -> RestartPolicy:
    values: dict[str, Any] = {}
    for key in _RESTART_KEYS:
        if key not in entry:
            continue
        value = entry[key]
        if key == "crash_limit":
            if value < 1:
                _fail(path, _where(table, key), f"must be a positive integer, got {value!r}")
            values[key] = value
            continue
        number = seconds(value)
        least = 0.0 if key == "stable_after" else None
        if number is None or not math.isfinite(number) or (number < 0 if least == 0.0 else number <= 0):
            bound = ">= 0" if least == 0.0 else "> 0"
            _fail(path, _where(table, key), f"must be a finite number of seconds {bound}, got {value!r}")
        values[key] = number
    policy = RestartPolicy(**values)
    if policy.backoff_max < policy.backoff_initial:
        key = "backoff_max" if "backoff_max" in values else "backoff_initial"
        problem = f"backoff_max ({policy.backoff_max:g}) must be >= backoff_initial ({policy.backoff_initial:g})"
        _fail(path, _where(table, key), problem)
    return policy


def _shared(path: str, shared: dict[str, Any], proxy: dict[str, Any]) -> tuple[SharedPlugin, ...]:
    """``[shared."/prefix"]`` tables: ``app`` (required), ``plugin`` and ``strip_prefix``."""
    found: list[SharedPlugin] = []
    for prefix, entry in shared.items():
        table = ("shared", prefix)
        if not isinstance(entry, dict):
            _fail(path, _where(("shared",), prefix), f'must be a table with app = "module:app", got {_kind(entry)}')
        for key, value in entry.items():
            if key not in _SHARED_KEYS:
                allowed = ", ".join(_SHARED_KEYS)
                _fail(path, _where(table, key), f"unknown key{_did_you_mean(key, _SHARED_KEYS)}; allowed: {allowed}")
            if key == "strip_prefix":
                if not isinstance(value, bool):
                    _fail(path, _where(table, key), f"must be true or false, got {_kind(value)}")
            elif not isinstance(value, str) or not value:
                _fail(path, _where(table, key), f"must be a non-empty string, got {_kind(value)}")
        if "app" not in entry:
            _fail(path, _where(table), 'missing required key app; add app = "package.module:app"')
        if prefix in proxy:
            _fail(
                path, _where(table), f"{prefix!r} is also routed in [proxy]; a plugin runs shared or isolated, not both"
            )
        try:
            Route(prefix, "http://localhost")  # the same prefix rules as a route
        except ValueError as exc:
            _fail(path, _where(table), str(exc))
        plugin = entry.get("plugin", prefix[1:])
        try:
            check_slug(plugin)
        except ValueError as exc:
            _fail(path, _where(table, "plugin" if "plugin" in entry else None), str(exc))
        found.append(SharedPlugin(plugin, entry["app"], prefix, entry.get("strip_prefix", False)))
    return tuple(found)


def _construct(path: str, prefix: str, url: str, options: dict[str, Any], *, table_form: bool) -> Route:
    """Call ``Route(...)``; on failure, blame the key whose value alone makes it fail."""
    try:
        return Route(prefix, url, **options)
    except (ValueError, TypeError) as exc:
        culprit = _culprit(prefix, url, options) if table_form else None
        if culprit:
            where = _where(("proxy", prefix), culprit)
        else:
            where = _where(("proxy", prefix)) if table_form else _where(("proxy",), prefix)
        raise DevConfigError(f"{path}: {where}: {exc}", path=path, key=where) from exc


def _culprit(prefix: str, url: str, options: dict[str, Any]) -> str | None:
    """Replay the constructor one input at a time to find the key to name; ``None`` means the prefix."""
    try:
        Upstream.parse(url)
    except (ValueError, TypeError):
        return "url"
    try:
        Route(prefix, url)
    except (ValueError, TypeError):
        return None
    for key, value in options.items():
        try:
            Route(prefix, url, **{key: value})
        except (ValueError, TypeError):
            return key
    return None


def _mount_path(path: str, value: object) -> str:
    where = _where(("settings",), "mount_path")
    if not isinstance(value, str):
        _fail(path, where, f'must be a string like "/api", got {_kind(value)}')
    try:
        return check_mount_path(value)
    except ValueError as exc:
        _fail(path, where, str(exc).removeprefix("mount_path "))


def _admin_path(path: str, value: object) -> str:
    where = _where(("settings",), "admin_path")
    if not isinstance(value, str):
        _fail(path, where, f'must be a string like "/_mint" ("" turns the admin views off), got {_kind(value)}')
    try:
        return check_mount_path(value)
    except ValueError:
        _fail(path, where, f"{value!r} must be \"\" or a path like \"/_mint\": a leading '/', no trailing '/'")


def _metrics(path: str, value: object) -> bool:
    if not isinstance(value, bool):
        _fail(path, _where(("settings",), "metrics"), f"must be true or false, got {_kind(value)}")
    return value


def _retry_window(path: str, value: object) -> float:
    where = _where(("settings",), "retry_window")
    window = seconds(value)
    if window is None:
        _fail(path, where, f"must be a number of seconds, got {_kind(value)}")
    if not (math.isfinite(window) and window >= 0):
        _fail(path, where, f"must be a finite number of seconds >= 0, got {value!r}")
    return window


def _fail(path: str, where: str, problem: str) -> NoReturn:
    raise DevConfigError(f"{path}: {where}: {problem}", path=path, key=where)


def _quote(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def _where(table: tuple[str, ...], key: str | None = None) -> str:
    """Render a TOML key path the way the user wrote it: ``[proxy."/peak"].url``."""
    header = "[" + ".".join(_quote(part) for part in table) + "]"
    return f"{header}.{_quote(key)}" if key else header


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    return f"{value!r} ({_TOML_TYPES.get(type(value), type(value).__name__)})"


def _did_you_mean(key: str, allowed: Any) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class ConfigWatcher:
    """Picks up edits to config.dev.toml while running; a broken edit keeps the last good table and logs the error.

        watcher = ConfigWatcher(config.path, config.routes)
        task = asyncio.create_task(watcher.run())   # cancel it to stop

    A change is a new ``(mtime_ns, size, inode)``. It applies once the file has held
    still for one poll (the same signature twice in a row), so a file caught half
    saved (an editor that truncates, then writes) never replaces the table. The
    baseline is taken at construction, right after the caller loaded the file (if by
    then the file differs from ``routes`` or is broken, the next checks reload or report it).
    Routes apply live; ``mount_path`` and ``retry_window`` are read at startup
    only, so changing them logs a warning asking for a restart. ``on_reload(config)``
    runs after each applied reload (the dev app restarts the plugins whose entry changed).
    """

    def __init__(
        self,
        path: str,
        routes: RouteTable,
        *,
        interval: float = 1.0,
        logger: logging.Logger | None = None,
        environ: Mapping[str, str] | None = None,
        on_reload: Callable[[DevConfig | None], object] | None = None,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int | float) or not interval > 0:
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        self.path = path
        self.interval = interval
        self._routes = routes
        self._environ = environ
        self._on_reload = on_reload  # called with the new config after a reload, None after a broken edit
        self._logger = logger or logging.getLogger("mint_proxy")
        self._signature = _signature(path)
        self._pending: tuple[int, int, int] | None | bool = False  # a new signature seen once (False: none)
        # Baseline for the restart warning: the settings the file holds now (best effort).
        self._settings: tuple[str, float, str, bool] | None = None
        try:
            config = load_dev_config(path, environ=environ)
        except DevConfigError:
            self._signature = None  # broken since the caller loaded it: the first check reports why
            return
        self._settings = (config.mount_path, config.retry_window, config.admin_path, config.metrics)
        if config.routes != routes:
            self._signature = None  # edited since the caller loaded it: reload on the first check

    def check(self) -> bool:
        """Poll once: reload if the file changed and has held still since the last poll.

        Return True when the route table was replaced.
        """
        signature = _signature(self.path)  # stat before reading, so an edit during the read is seen next time
        if signature == self._signature:
            self._pending = False
            return False
        if signature != self._pending:
            self._pending = signature  # still changing, perhaps: look again next poll
            return False
        self._signature, self._pending = signature, False
        try:
            config = load_dev_config(self.path, environ=self._environ)
        except DevConfigError as exc:
            self._logger.error("%s; keeping the last good routes (%d)", exc, len(self._routes))
            if self._on_reload is not None:
                self._on_reload(None)
            return False
        settings = (config.mount_path, config.retry_window, config.admin_path, config.metrics)
        if self._settings is not None and settings != self._settings:
            self._logger.warning(
                "%s: a [settings] value changed; restart the proxy to apply it (routes apply now)",
                self.path,
            )
        self._settings = settings
        self._routes.replace(config.routes)
        count = len(config.routes)
        if count:
            self._logger.info("reloaded %s: %s", self.path, describe_routes(config.routes))
        else:
            self._logger.warning("reloaded %s: %s", self.path, describe_routes(config.routes))
        if self._on_reload is not None:
            self._on_reload(config)
        return True

    async def run(self) -> None:
        """Poll every ``interval`` seconds until cancelled; errors are logged, never fatal."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception:
                self._logger.exception("error while checking %s for changes", self.path)


def describe_routes(routes: RouteTable) -> str:
    """``"2 routes: /a -> http://..., /b -> unix:..."``, or the empty table's warning text."""
    count = len(routes)
    if not count:
        return "no routes: every request will be answered 404; add routes under [proxy]"
    listed = ", ".join(f"{route.prefix} -> {route.upstream}" for route in routes.routes())
    return f"{count} route{'' if count == 1 else 's'}: {listed}"


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)
