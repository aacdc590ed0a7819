"""Read-only views of the supervisor's state: the JSON document, and a small ASGI app serving it.

    platform.mount("/admin/plugins", status_app(runtime_dir))   # GET -> the JSON below

Both read ``<runtime_dir>/state.json`` (any worker can serve them, not only the one
that supervises) and report whether a supervisor holds the directory's lock now::

    {"runtime_dir": "...", "supervisor": {"pid": 123, "started": 1764..., "running": true},
     "plugins": {"peak-picking": {"state": "READY", "pid": 456, "restarts": 0, ...}}}

``mint-proxy status [--json]`` prints the same document.
"""

import json
import os
from typing import Any

from .._types import ASGIApp, Receive, Scope, Send
from ._election import supervised


def status_document(runtime_dir: str) -> dict[str, Any]:
    """The runtime dir's state as plain JSON data; ``supervisor`` is None if no state was ever written.

    Raises ``StateFileError`` when ``state.json`` is there but unreadable.
    """
    from .runtime import read_state

    state = read_state(runtime_dir)
    supervisor = None
    if state is not None:
        supervisor = {"pid": state.pid, "started": state.started, "running": supervised(runtime_dir)}
    plugins = {} if state is None else {slug: status.to_json() for slug, status in sorted(state.plugins.items())}
    return {"runtime_dir": os.path.abspath(runtime_dir), "supervisor": supervisor, "plugins": plugins}


def status_app(runtime_dir: str) -> ASGIApp:
    """An ASGI app answering GET/HEAD with ``status_document(runtime_dir)`` as JSON (405 otherwise)."""
    from ..errors import MintProxyError

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        status, document = 200, None
        if scope["method"] not in ("GET", "HEAD"):
            status, document = 405, {"error": "method_not_allowed", "detail": "use GET"}
        else:
            try:
                document = status_document(runtime_dir)
            except MintProxyError as exc:
                status, document = 503, {"error": "state_unreadable", "detail": str(exc)}
        body = json.dumps(document).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"cache-control", b"no-store"),
        ]
        if status == 405:
            headers.append((b"allow", b"GET, HEAD"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    return app
