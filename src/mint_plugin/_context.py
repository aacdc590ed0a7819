"""The request a plugin is serving right now, in both modes.

The plugin host (isolated mode) and the in-process mount (shared mode) set
``current_request`` for the duration of every HTTP or WebSocket request they
hand to a plugin. Log records and the platform client read it, so plugin code
never passes a request id or an internal token around by hand.
"""

from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass

REQUEST_ID_HEADER = b"x-request-id"
INTERNAL_TOKEN_HEADER = b"x-mint-internal-token"


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What a plugin's outgoing calls and log lines need from the request being served."""

    request_id: str
    internal_token: str | None = None

    @classmethod
    def from_headers(cls, headers: Iterable[tuple[bytes, bytes]]) -> "RequestContext":
        """Read the request id and internal token from ASGI header pairs (lowercase names)."""
        request_id = ""
        token: str | None = None
        for name, value in headers:
            if name == REQUEST_ID_HEADER:
                request_id = value.decode("latin-1")
            elif name == INTERNAL_TOKEN_HEADER:
                token = value.decode("latin-1")
        return cls(request_id, token)


current_request: ContextVar[RequestContext | None] = ContextVar("mint_current_request", default=None)
