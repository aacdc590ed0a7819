"""A plugin app for the dev-mode tests (``tests.wire_apps:echo``): it answers with what the proxy sent.

GET <anything> -> JSON {"path", "request_id", "token", "pid"}: the request id and internal
token headers as received, so a test can tell its own answer from another's and which
worker (each signs its own cached token) forwarded it.
"""

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]


async def echo(
    scope: Message, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].removeprefix("lifespan.")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    if scope["type"] != "http":
        return
    headers = dict(scope["headers"])
    body = json.dumps(
        {
            "path": scope["path"],
            "request_id": headers.get(b"x-request-id", b"").decode(),
            "token": headers.get(b"x-mint-internal-token", b"").decode(),
            "pid": os.getpid(),
        }
    ).encode()
    fields = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": fields})
    await send({"type": "http.response.body", "body": body})
