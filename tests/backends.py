"""Plugin backends for tests: pure ASGI apps that report what they received.

Behaviour is chosen by the last path segment, so the same app serves
``/peak/echo`` and ``/api/peak/echo`` and stripped paths alike.
"""

import asyncio
import gzip
import hashlib
import json
import threading
from typing import Any
from urllib.parse import parse_qs

Scope = dict[str, Any]

GZIPPED = gzip.compress(b"hello gzip " * 100, mtime=0)


class Plugin:
    """A recording plugin. ``seen`` holds one dict per request that reached it.

    ``release`` is what ``/held`` and ``/gated`` wait for: the test sets it when it has seen what it
    waits for, so no test sleeps to let the plugin get somewhere first.
    """

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.events: list[str] = []
        self.release = threading.Event()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        name = scope["path"].rstrip("/").rsplit("/", 1)[-1]
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        record: dict[str, Any] = {
            "method": scope["method"],
            "raw_path": scope["raw_path"].decode("latin-1"),
            "path": scope["path"],
            "query_string": scope["query_string"].decode("latin-1"),
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]],
        }
        self.seen.append(record)
        handler = getattr(self, "do_" + name.replace("-", "_"), None)
        if handler is None or name.startswith("_"):
            handler = self.do_echo
        await handler(scope, receive, send, query, record)

    async def read_body(self, receive: Any, record: dict[str, Any]) -> bytes:
        digest = hashlib.sha256()
        size = 0
        chunks = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.events.append("disconnect-during-body")
                record["disconnected"] = True
                break
            body = message.get("body", b"")
            digest.update(body)
            size += len(body)
            chunks += 1
            if not message.get("more_body"):
                break
        record.update(body_len=size, body_sha256=digest.hexdigest(), body_chunks=chunks)
        return b""

    async def do_echo(
        self, scope: Scope, receive: Any, send: Any, query: dict[str, str], record: dict[str, Any]
    ) -> None:
        await self.read_body(receive, record)
        await json_response(send, record, status=int(query.get("status", 200)))

    async def do_upload(
        self, scope: Scope, receive: Any, send: Any, query: dict[str, str], record: dict[str, Any]
    ) -> None:
        await self.read_body(receive, record)
        await json_response(send, {k: record.get(k) for k in ("body_len", "body_sha256", "body_chunks")})

    async def do_stream(
        self, scope: Scope, receive: Any, send: Any, query: dict[str, str], record: dict[str, Any]
    ) -> None:
        """``?chunks=N&size=S&delay=D&length=1``: N chunks of S bytes, D seconds apart."""
        chunks, size = int(query.get("chunks", 3)), int(query.get("size", 10))
        delay = float(query.get("delay", 0))
        headers = [(b"content-type", b"application/octet-stream")]
        if query.get("length"):
            headers.append((b"content-length", str(chunks * size).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        block = b"x" * size
        for i in range(chunks):
            if delay:
                await asyncio.sleep(delay)
            self.events.append(f"sent {i}")
            await send({"type": "http.response.body", "body": block, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def do_gated(
        self, scope: Scope, receive: Any, send: Any, query: dict[str, str], record: dict[str, Any]
    ) -> None:
        """``?chunks=N``: N chunks of 5 bytes; after the first, nothing more until ``release`` is set."""
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(int(query.get("chunks", 3))):
            await send({"type": "http.response.body", "body": b"x" * 5, "more_body": True})
            self.events.append(f"sent {i}")
            if i == 0:
                released = await asyncio.to_thread(self.release.wait, 10)
                self.events.append("released" if released else "never released")
        await send({"type": "http.response.body", "body": b""})

    async def do_held(
        self, scope: Scope, receive: Any, send: Any, query: dict[str, str], record: dict[str, Any]
    ) -> None:
        """Answers ``{"held": true}`` once ``release`` is set (``false`` if it never is, after 10 s)."""
        released = await asyncio.to_thread(self.release.wait, 10)
        await json_response(send, {"held": released})

    async def do_sse(
        self, scope: Scope, receive: Any, send: Any, query: dict[str, str], record: dict[str, Any]
    ) -> None:
        """``?events=N&delay=D``: N server-sent events, D seconds apart (each in a chunk of its own)."""
        events, delay = int(query.get("events", 3)), float(query.get("delay", 0.05))
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i in range(events):
            await send({"type": "http.response.body", "body": b"data: event %d\n\n" % i, "more_body": True})
            await asyncio.sleep(delay)
        await send({"type": "http.response.body", "body": b""})

    async def do_gzip(
        self, scope: Scope, receive: Any, send: Any, query: dict[str, str], record: dict[str, Any]
    ) -> None:
        headers = [
            (b"content-type", b"text/plain"),
            (b"content-encoding", b"gzip"),
            (b"content-length", str(len(GZIPPED)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": GZIPPED})

    async def do_cookies(
        self, scope: Scope, receive: Any, send: Any, query: dict[str, str], record: dict[str, Any]
    ) -> None:
        headers = [(b"set-cookie", b"a=1; Path=/"), (b"set-cookie", b"b=2; Path=/"), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def do_redirect(
        self, scope: Scope, receive: Any, send: Any, query: dict[str, str], record: dict[str, Any]
    ) -> None:
        """Redirect to ``?to=`` (``{origin}`` is replaced by this server's own origin)."""
        host, port = scope["server"] or ("localhost", 80)
        location = query.get("to", "/").replace("{origin}", f"http://{host}:{port}")
        headers = [(b"location", location.encode()), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 302, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def do_status(
        self, scope: Scope, receive: Any, send: Any, query: dict[str, str], record: dict[str, Any]
    ) -> None:
        """``?code=N``: a bodiless status (204, 304) or any other with a short body."""
        code = int(query.get("code", 204))
        await send({"type": "http.response.start", "status": code, "headers": [(b"etag", b'"v1"')]})
        await send({"type": "http.response.body", "body": b""})

    async def do_slow(
        self, scope: Scope, receive: Any, send: Any, query: dict[str, str], record: dict[str, Any]
    ) -> None:
        """``?delay=D``: answers after D seconds, unless its client (the proxy) leaves first."""
        try:
            async with asyncio.timeout(float(query.get("delay", 1))):
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.events.append("slow-abandoned")
                return
        except asyncio.CancelledError:
            self.events.append("slow-cancelled")
            raise
        except TimeoutError:
            pass
        await json_response(send, {"slow": True})

    async def do_hang(
        self, scope: Scope, receive: Any, send: Any, query: dict[str, str], record: dict[str, Any]
    ) -> None:
        """Never answers; notices when the proxy gives up on it."""
        await self.read_body(receive, record)
        message = await receive()
        self.events.append(message["type"])

    async def do_early(
        self, scope: Scope, receive: Any, send: Any, query: dict[str, str], record: dict[str, Any]
    ) -> None:
        """Answers 413 without reading the request body."""
        await json_response(send, {"early": True}, status=413)

    async def do_leak(
        self, scope: Scope, receive: Any, send: Any, query: dict[str, str], record: dict[str, Any]
    ) -> None:
        """Tries to send internal headers back to the client."""
        headers = [
            (b"x-mint-internal-token", b"leaked"),
            (b"x_mint_internal_token", b"leaked"),
            (b"x-request-id", b"plugin-made-this-up"),
            (b"content-length", b"2"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    async def websocket(self, scope: Scope, receive: Any, send: Any) -> None:
        message = await receive()
        assert message["type"] == "websocket.connect"
        self.seen.append(
            {
                "raw_path": scope["raw_path"].decode("latin-1"),
                "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]],
                "subprotocols": scope.get("subprotocols", []),
            }
        )
        if scope["path"].endswith("/refuse"):
            await send({"type": "websocket.close", "code": 1008})
            return
        subprotocols = scope.get("subprotocols") or []
        await send({"type": "websocket.accept", "subprotocol": subprotocols[0] if subprotocols else None})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self.events.append(f"ws-closed {message.get('code')}")
                return
            text = message.get("text")
            if text is not None and text.startswith("close:"):
                await send({"type": "websocket.close", "code": int(text[6:]), "reason": "asked to"})
                return
            if text is not None:
                await send({"type": "websocket.send", "text": "echo:" + text})
            else:
                await send({"type": "websocket.send", "bytes": b"echo:" + message["bytes"]})


async def json_response(send: Any, data: Any, *, status: int = 200) -> None:
    body = json.dumps(data).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def header_values(record: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in record["headers"] if n == name]
