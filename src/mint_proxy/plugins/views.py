"""``PluginStatusApp``: a read-only JSON view of the supervised plugins, for an admin path.

    platform.mount("/admin/plugins", PluginStatusApp(runtime_dir=default_runtime_dir()))

    GET <mount>/         {"supervisor": {"pid", "started", "running"}, "plugins": {slug: status}}
    GET <mount>/<slug>   one plugin's status; 404 if no such plugin

Given a ``supervisor`` it shows that live object; given a ``runtime_dir`` it reads
``state.json``, so it answers the same in every worker process. It changes nothing:
control stays with the Python API and the CLI. Mount it behind the platform's own
admin authentication: log tails can hold whatever plugins print.
"""

import json
import os
from typing import Any

from .._respond import error_body
from .._types import Receive, Scope, Send
from ..headers import client_request_id, new_request_id
from .runtime import StateFileError, read_state, supervisor_running
from .supervisor import PluginSupervisor


class PluginStatusApp:
    """Serve plugin statuses as JSON from a live ``supervisor`` or a ``runtime_dir``'s state.json."""

    def __init__(
        self, *, supervisor: PluginSupervisor | None = None, runtime_dir: str | os.PathLike[str] | None = None
    ) -> None:
        if (supervisor is None) == (runtime_dir is None):
            raise TypeError("PluginStatusApp takes exactly one of supervisor= or runtime_dir=")
        self._supervisor = supervisor
        self._runtime_dir = os.fspath(runtime_dir) if runtime_dir is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan and websocket: nothing to do
        request_id = client_request_id(scope["headers"]) or new_request_id()
        if scope["method"] not in ("GET", "HEAD"):
            await _send(send, scope, 405, *error_body("method_not_allowed", "only GET", request_id), allow=True)
            return
        try:
            document = self._document()
        except StateFileError as exc:
            await _send(send, scope, 503, *error_body("state_unreadable", str(exc), request_id))
            return
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        slug = path.strip("/")
        if not slug:
            await _send(send, scope, 200, *_json(document, request_id))
        elif slug in document["plugins"]:
            await _send(send, scope, 200, *_json(document["plugins"][slug], request_id))
        else:
            await _send(send, scope, 404, *error_body("not_found", f"no plugin named {slug!r}", request_id))

    def _document(self) -> dict[str, Any]:
        if self._supervisor is not None:
            plugins = self._supervisor.status()
            supervisor = {
                "pid": os.getpid(),
                "started": self._supervisor.started_at,
                "running": self._supervisor.started,
            }
        else:
            assert self._runtime_dir is not None
            state = read_state(self._runtime_dir)
            if state is None:
                return {"supervisor": None, "plugins": {}}
            plugins = state.plugins
            supervisor = {"pid": state.pid, "started": state.started, "running": supervisor_running(state)}
        return {"supervisor": supervisor, "plugins": {slug: status.to_json() for slug, status in plugins.items()}}


def _json(document: Any, request_id: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    body = json.dumps(document).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"cache-control", b"no-store"),
        (b"x-request-id", request_id),
    ]
    return body, headers


async def _send(
    send: Send, scope: Scope, status: int, body: bytes, headers: list[tuple[bytes, bytes]], *, allow: bool = False
) -> None:
    if allow:
        headers = [*headers, (b"allow", b"GET, HEAD")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
