"""Responses the proxy makes itself: the JSON error.

Every ``ProxyError`` becomes a response here and nowhere else. (The access line is
``_accesslog``'s.)
"""

import json
from collections.abc import Sequence

from ._types import Message, RawHeaders, Send
from .errors import ProxyError
from .headers import REQUEST_ID_FIELD


def error_body(error: str, detail: str, request_id: bytes) -> tuple[bytes, RawHeaders]:
    """JSON with ``error``, ``detail`` and ``request_id``, and its headers."""
    body = json.dumps({"error": error, "detail": detail, "request_id": request_id.decode("ascii")}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (REQUEST_ID_FIELD, request_id),
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
) -> int:
    """Send the JSON error response; return its body's length (the access line's bytes out)."""
    body, headers = error_body(error, detail, request_id)
    headers += extra_headers
    if close:
        headers.append((b"connection", b"close"))
    message: Message = {"type": "http.response.start", "status": status, "headers": headers}
    await send(message)
    await send({"type": "http.response.body", "body": body})
    return len(body)


async def send_proxy_error(send: Send, error: ProxyError, request_id: bytes) -> int:
    """Send ``error`` as its JSON response (status, headers, whether to close); return the body's length."""
    return await send_error(
        send,
        error.status,
        error.error,
        error.detail,
        request_id,
        close=error.close_connection,
        extra_headers=error.headers,
    )
