"""Responses the proxy makes itself: the JSON error, and the access log line.

Every ``ProxyError`` becomes a response here and nowhere else.
"""

import json
import logging
import time
from collections.abc import Sequence

from ._types import Message, RawHeaders, Scope, Send
from .headers import REQUEST_ID_HEADER

logger = logging.getLogger("mint_proxy")


def error_body(error: str, detail: str, request_id: bytes) -> tuple[bytes, RawHeaders]:
    """JSON with ``error``, ``detail`` and ``request_id``, and its headers."""
    body = json.dumps({"error": error, "detail": detail, "request_id": request_id.decode("ascii")}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (REQUEST_ID_HEADER, request_id),
    ]
    return body, headers


async def send_error(
    send: Send,
    status: int,
    error: str,
    detail: str,
    request_id: bytes,
    *,
    close: bool = False,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    body, headers = error_body(error, detail, request_id)
    headers += extra_headers
    if close:
        headers.append((b"connection", b"close"))
    message: Message = {"type": "http.response.start", "status": status, "headers": headers}
    await send(message)
    await send({"type": "http.response.body", "body": body})


def log_access(request_id: bytes, scope: Scope, plugin: str, status: int, started: float) -> None:
    """One line per proxied request on the ``mint_proxy`` logger, at INFO."""
    if logger.isEnabledFor(logging.INFO):
        duration = (time.perf_counter() - started) * 1000 if started else 0.0
        logger.info(
            '%s "%s %s" plugin=%s status=%d %.1fms',
            request_id.decode("ascii", "replace"),
            scope.get("method", "WEBSOCKET"),
            scope["path"],
            plugin,
            status,
            duration,
        )
