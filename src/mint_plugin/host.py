"""The plugin host: serves one ASGI app on a Unix socket for the mint_proxy supervisor.

Run by file path under the plugin's interpreter (a venv that holds uvicorn and a
copy of ``mint_plugin`` is enough; this file imports nothing else)::

    python host.py --app peak_picking.app:app --uds /run/user/1000/mint-proxy/peak-picking.sock \\
        [--lifeline FD] [--parent PID] [--grace SECONDS]

What it adds to ``uvicorn --uds``:

* It dies with its supervisor. On Linux it arms ``PR_SET_PDEATHSIG`` (SIGTERM) and
  then checks that its parent is still ``--parent`` (the supervisor may have died
  before the signal was armed). Everywhere, EOF on the ``--lifeline`` pipe (the
  supervisor holds the only write end) ends it: SIGTERM to itself (uvicorn's
  graceful shutdown), then SIGKILL to its process group after ``--grace`` seconds.
* ``mint_plugin.current_request`` is set for every HTTP and WebSocket request from
  its ``X-Request-Id`` and ``X-Mint-Internal-Token`` headers.
* Every log record written while a request is handled carries that request's id:
  ``record.request_id`` (empty outside a request) and ``record.request_tag``
  (`` [req=<id>]``), which the host's own format prints, so one grep for the id
  finds the proxy's access line and the plugin's lines alike.
* A stale socket file left by a killed predecessor is replaced; the socket is
  made 0600 (the runtime dir is 0700 as well).
"""

import argparse
import contextlib
import ctypes
import logging
import logging.config
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

try:
    import uvicorn
    from uvicorn.importer import ImportFromStringError, import_from_string

    from mint_plugin import RequestContext, current_request
except ImportError as exc:  # a misprovisioned venv
    sys.exit(f"mint_plugin host: {exc.name or exc} is not installed for {sys.executable}")

_STARTUP_FAILURE = 3
_PR_SET_PDEATHSIG = 1

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

LOG_FORMAT = "%(levelname)s%(request_tag)s %(name)s: %(message)s"


def install_request_log_context() -> None:
    """Give every log record ``request_id`` and ``request_tag`` from ``current_request``."""
    previous = logging.getLogRecordFactory()

    def record_with_request(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        context = current_request.get()
        request_id = context.request_id if context is not None else ""
        record.request_id = request_id
        record.request_tag = f" [req={request_id}]" if request_id else ""
        return record

    logging.setLogRecordFactory(record_with_request)


def with_request_context(app: ASGIApp) -> ASGIApp:
    """Wrap ``app`` so ``current_request`` is set for each HTTP/WebSocket request's task."""

    async def app_with_request_context(
        scope: Scope, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
    ) -> None:
        if scope["type"] not in ("http", "websocket"):
            await app(scope, receive, send)
            return
        # Not reset afterwards: uvicorn runs each request in a task of its own, whose context ends
        # with it, and its report of the app's exception (traceback, 500 access line) is written
        # after the app returns: that line must carry the request id too.
        current_request.set(RequestContext.from_headers(scope.get("headers", ())))
        await app(scope, receive, send)

    return app_with_request_context


def _configure_logging() -> None:
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"plain": {"format": LOG_FORMAT}},
            "handlers": {
                "stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}
            },
            "root": {"handlers": ["stderr"], "level": "INFO"},
            "loggers": {
                "uvicorn": {"handlers": [], "propagate": True},
                "uvicorn.error": {"handlers": [], "propagate": True},
                "uvicorn.access": {"handlers": [], "propagate": True},
            },
        }
    )


def _arm_parent_death_signal(parent: int | None) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    # The parent may have died before the signal was armed: then nobody would send it.
    if parent is not None and os.getppid() != parent:
        sys.exit("mint_plugin host: the supervisor is gone")


def _watch_lifeline(fd: int, grace: float) -> None:
    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 512):
                pass
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
        time.sleep(grace)
        if os.getpgrp() == os.getpid():
            os.killpg(0, signal.SIGKILL)  # the host and anything the app started
        os._exit(1)

    threading.Thread(target=watch, name="mint-lifeline", daemon=True).start()


def _bind(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
    except OSError:
        sock.close()
        raise
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mint_plugin host", description="Serve one ASGI app on a Unix socket.")
    parser.add_argument("--app", required=True, help="ASGI import string, module:attribute")
    parser.add_argument("--uds", required=True, help="Unix socket path to listen on")
    parser.add_argument("--lifeline", type=int, default=None, help="fd whose EOF means the supervisor is gone")
    parser.add_argument("--parent", type=int, default=None, help="the supervisor's pid")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds from lifeline EOF to SIGKILL")
    args = parser.parse_args(argv)

    _arm_parent_death_signal(args.parent)
    if args.lifeline is not None:
        _watch_lifeline(args.lifeline, args.grace)
    # Run by path, sys.path[0] is this file's directory; the app is found like `python -m` finds it.
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == here:
        sys.path[0] = os.getcwd()
    install_request_log_context()
    _configure_logging()
    log = logging.getLogger("mint_plugin.host")
    try:
        app = import_from_string(args.app)
    except ImportFromStringError as exc:
        log.error("cannot load app %r: %s", args.app, exc)
        return _STARTUP_FAILURE
    try:
        sock = _bind(args.uds)
    except OSError as exc:
        log.error("cannot listen on %s: %s", args.uds, exc.strerror or exc)
        return _STARTUP_FAILURE
    config = uvicorn.Config(with_request_context(app), log_config=None, lifespan="auto")
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return 0 if server.started else _STARTUP_FAILURE


if __name__ == "__main__":
    sys.exit(main())
