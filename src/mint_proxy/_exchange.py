"""One finished request as the access log and the metrics both see it, and the escaping of its fields.

Its own module so that ``_accesslog`` (which builds and prints exchanges) and ``metrics``
(which counts them) both import it and neither imports the other.
"""

import logging
import re
from typing import Any

from ._types import Scope

# Printable ASCII but '"' and '\': what may appear in a log field as itself.
_SAFE = bytes(b for b in range(0x20, 0x7F) if b not in b'"\\')
_SAFE_TABLE = bytes(b if b in _SAFE else 0x20 for b in range(256))  # an unsafe byte becomes a (safe) space
_UNSAFE = re.compile(rb"[^ -!#-\[\]-~]")


def escape(raw: bytes) -> str:
    """``raw`` as ASCII text with every control, non-ASCII, ``"`` and ``\\`` byte written ``\\xHH``."""
    if raw.translate(_SAFE_TABLE) == raw:
        return raw.decode("ascii")
    return _UNSAFE.sub(lambda m: b"\\x%02X" % m[0][0], raw).decode("ascii")


def escape_text(text: str) -> str:
    """``escape`` for a str field (UTF-8 bytes; surrogates from undecodable input kept as bytes)."""
    return escape(text.encode("utf-8", "surrogateescape"))


class Exchange:
    """One finished request as the access line and the metrics see it.

    ``status`` is the status the client received (``499``: it left before any answer;
    ``101``: a WebSocket session). ``reason`` says why the proxy refused or aborted, else
    ``""``; ``error`` is the ``ProxyError`` behind it; ``aborted`` means the head went out
    and the body did not finish. Times are seconds; ``ttfb`` is ``None`` without an
    upstream response head.
    """

    __slots__ = (
        "scope",
        "plugin",
        "request_id",
        "status",
        "duration",
        "bytes_in",
        "bytes_out",
        "ttfb",
        "reason",
        "error",
        "aborted",
        "trace_id",
    )

    def __init__(
        self,
        scope: Scope,
        plugin: str,
        request_id: bytes,
        status: int,
        duration: float,
        *,
        bytes_in: int = 0,
        bytes_out: int = 0,
        ttfb: float | None = None,
        reason: str = "",
        error: Exception | None = None,
        aborted: bool = False,
        trace_id: bytes | None = None,
    ) -> None:
        self.scope = scope
        self.plugin = plugin
        self.request_id = request_id
        self.status = status
        self.duration = duration
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        self.ttfb = ttfb
        self.reason = reason
        self.error = error
        self.aborted = aborted
        self.trace_id = trace_id

    @property
    def method(self) -> str:
        return str(self.scope.get("method") or "WEBSOCKET") if self.scope["type"] == "http" else "WEBSOCKET"

    @property
    def level(self) -> int:
        return logging.WARNING if self.aborted or self.status in (502, 504) else logging.INFO

    def fields(self) -> dict[str, Any]:
        """The access line's fields, every client-supplied one escaped (the JSON format's object)."""
        scope = self.scope
        raw_path = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        client = scope.get("client")
        return {
            "request_id": escape(self.request_id),
            "trace_id": self.trace_id.decode("ascii") if self.trace_id else None,
            "client": escape_text(f"{client[0]}:{client[1]}") if client else None,
            "method": escape_text(self.method),
            "path": escape(raw_path),
            "query": escape(scope.get("query_string", b"")),
            "plugin": escape_text(self.plugin),
            "status": self.status,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration_ms": round(self.duration * 1000, 3),
            "ttfb_ms": None if self.ttfb is None else round(self.ttfb * 1000, 3),
            "reason": escape_text(self.reason) if self.reason else None,
        }

    def __str__(self) -> str:
        """The text line: ``<request id> "<METHOD> <path>?<query>" plugin= status= ...``."""
        f = self.fields()
        target = f["path"] + ("?" + f["query"] if f["query"] else "")
        line = (
            f'{f["request_id"]} "{f["method"]} {target}" plugin={f["plugin"]} status={f["status"]} '
            f"{f['duration_ms']:.1f}ms in={f['bytes_in']} out={f['bytes_out']} "
            f"ttfb={'-' if f['ttfb_ms'] is None else format(f['ttfb_ms'], '.1f') + 'ms'} client={f['client'] or '-'}"
        )
        if f["trace_id"]:
            line += f" trace={f['trace_id']}"
        if f["reason"]:
            line += f' reason="{f["reason"]}"'
        return line
