"""Tiny ASGI plugins that the supervisor tests run in real processes (``tests.plugin_apps:<name>``).

They read their behaviour from the environment the supervisor gives them
(``PluginSpec.env``), so one module serves every test.
"""

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mint_plugin import current_request

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

log = logging.getLogger("plugin_apps")


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send, startup: Callable[[], Awaitable[str | None]]) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            failure = await startup()
            if failure:
                await send({"type": "lifespan.startup.failed", "message": failure})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _start_normally() -> str | None:
    if os.environ.get("IGNORE_SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    crash_file = os.environ.get("CRASH_FILE")
    if crash_file and os.path.exists(crash_file):
        print(f"crash-marker: {crash_file} exists", file=sys.stderr)
        return "crash file present"
    return None


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    """GET / -> 'hi'; /healthz -> 200 only once $HEALTH_FILE exists; /env, /bigout, /exit0, /raise, /whoami."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send, _start_normally)
        return
    if scope["type"] != "http":
        return
    path = scope["path"]
    log.info("handling %s", path)
    path = "/" + path.rsplit("/", 1)[-1]  # behind a proxy that keeps the prefix, too
    if path == "/healthz":
        health_file = os.environ.get("HEALTH_FILE", "")
        await _respond(send, 200 if os.path.exists(health_file) else 503, b"")
    elif path == "/env":
        await _respond(send, 200, json.dumps(dict(os.environ)).encode())
    elif path == "/bigout":
        sys.stdout.write("x" * (10 * 1024 * 1024))
        sys.stdout.flush()
        await _respond(send, 200, b"written")
    elif path == "/exit0":
        os._exit(0)
    elif path == "/raise":
        raise RuntimeError("raised-in-route")
    elif path == "/whoami":
        context = current_request.get()
        await _respond(send, 200, (context.request_id if context else "").encode())
    else:
        await _respond(send, 200, b"hi")


async def fails_at_startup(scope: Scope, receive: Receive, send: Send) -> None:
    """Lifespan startup fails (uvicorn exits 3) after printing a marker line."""
    if scope["type"] == "lifespan":

        async def fail() -> str | None:
            print("boom-marker: startup failed on purpose", file=sys.stderr)
            return "boom"

        await _lifespan(receive, send, fail)


async def never_ready(scope: Scope, receive: Receive, send: Send) -> None:
    """Lifespan startup never completes, so the socket never listens."""
    if scope["type"] == "lifespan":

        async def hang() -> str | None:
            await asyncio.sleep(3600)
            return None

        await _lifespan(receive, send, hang)
