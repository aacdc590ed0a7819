"""Noticing that an HTTP client went away while its request is with a plugin.

ASGI reports a client that went away only through ``receive()``: uvicorn drops ``send()``
silently, and ``receive()`` answers ``http.disconnect`` once the request body has been read.
While the proxy waits on the plugin, nobody would notice: the plugin would work for nobody.
``watch_client`` waits on ``receive()`` and, once the client leaves, aborts the upstream
connection with ``ClientGone``: the plugin's work stops, the connection is never pooled, and
the proxy's task learns why its exchange failed.

A task per request would cost more than the rest of the exchange's bookkeeping, and most
exchanges are over within milliseconds. So the watch is handed to the connection with
``Connection.when_slow``: the upstream pool's one ticker starts it only for an exchange still
running one to two ``TICK`` periods later, and the connection cancels it when the exchange ends.
"""

from ._types import Receive
from ._upstream import Connection
from .errors import ProxyError


class ClientGone(ProxyError):
    """The client went away before the exchange ended (never a response: nobody is there for it)."""

    status = 499  # nginx's "client closed request", for the access log and the metrics
    error = "client_closed_request"


async def watch_client(conn: Connection, receive: Receive) -> None:
    """Abort ``conn`` once the client behind ``receive`` leaves.

    Start it only once the whole request body has been read from ``receive``: any body
    message still coming is dropped (the plugin answered without reading it: nobody wants it).
    """
    while (await receive())["type"] != "http.disconnect":
        pass
    conn.abort(ClientGone("the client closed the connection"))
