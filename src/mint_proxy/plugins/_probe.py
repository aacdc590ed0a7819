"""Readiness: one HTTP/1.1 GET over the plugin's real endpoint (Unix socket or loopback TCP).

With a ``health_path`` only a 200 counts; without one, any response below 500
(the app answered, even with a 404). A refused connection, a reset or garbage
means "not yet". No HTTP client library: a status line is all that is read.
"""

import asyncio
import contextlib


async def probe(endpoint: str, path: str | None, *, timeout: float) -> bool:
    """True if the plugin at ``endpoint`` (``unix:/path`` or ``http://127.0.0.1:port``) is ready."""
    try:
        async with asyncio.timeout(timeout):
            status = await _get_status(endpoint, path or "/")
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
        return False
    return status == 200 if path else 100 <= status < 500


async def _get_status(endpoint: str, path: str) -> int:
    if endpoint.startswith("unix:"):
        reader, writer = await asyncio.open_unix_connection(endpoint[len("unix:") :])
        host = "localhost"
    else:
        host_port = endpoint.split("://", 1)[-1]
        host, _, port = host_port.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        host = host_port
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: mint-proxy-probe\r\nConnection: close\r\n\r\n"
        writer.write(request.encode("ascii"))
        await writer.drain()
        line = await reader.readuntil(b"\n")
        version, status, *_ = line.split(None, 2) + [b""]
        if not version.startswith(b"HTTP/"):
            raise ValueError("not an HTTP response")
        return int(status)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
