"""ASGI type aliases, loose on purpose (as in starlette.types)."""

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]

Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# A header list exactly as ASGI carries it: lowercase names, order and repeats kept.
RawHeaders = list[tuple[bytes, bytes]]
