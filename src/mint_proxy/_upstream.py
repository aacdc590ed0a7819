"""The upstream client: a lean keep-alive HTTP/1.1 connection pool over asyncio.

Theory of operation
-------------------
This module is the seam between the proxy and the plugin processes; the
proxy's speed lives here, so it is kept small and free of abstractions that
cost per request.

* ``Connection`` is an ``asyncio.Protocol``. ``data_received`` parses the
  response as bytes arrive (``_http11`` does the strict parsing) and queues
  body chunks; the proxy's task waits with ``wait`` (a bare future, no coroutine
  in between) and takes them with ``next_body`` (``read_head``/``read_body``
  wrap the two). Nothing is ever joined into a whole body: a chunk is passed on
  as it came, and chunks that queued up while the client was slower (never more
  than ``HIGH_WATER`` bytes) go out joined in one send.
* Flow control both ways. Upstream to client: once more than ``HIGH_WATER``
  bytes are queued, reading from the plugin pauses until the client side has
  taken them (the ASGI ``send`` awaits the client's socket). Client to upstream:
  ``drain`` waits while the transport's write buffer is over its limit, with the same
  timed ``wait`` as a response: a plugin that stops reading the body is as silent as
  one that stops answering, and an early answer ends the wait too.
* Waiting uses one future per wait, not ``asyncio.wait_for`` and not a task.
  Timeouts are not timers either: a timer costs as much as the rest of an
  exchange's bookkeeping (``call_later`` + ``cancel`` is ~1.7 µs on uvloop).
  Each wait records its deadline, and the pool's one ticker, running every
  ``TICK`` seconds while exchanges are in flight, expires overdue waits
  (so a timeout fires up to ``TICK`` late) and starts the client watcher of
  exchanges older than ``WATCH_DELAY``.
* The client watcher: once the request is sent, ``watch_client(receive)``
  hands the exchange the ASGI ``receive``. ASGI reports a client that went
  away only through ``receive()`` (uvicorn drops ``send()`` silently), so a
  slow exchange gets a task waiting on it that aborts the connection when the
  client leaves: the plugin stops working for nobody and the connection is
  never pooled. Most exchanges are over long before ``WATCH_DELAY`` and never
  pay for that task.
* The hot path never calls ``asyncio.get_running_loop()``: CPython checks the
  process id on every call, a ``getpid`` syscall each time. Connections keep
  their loop; the pool's clock is ``time.monotonic()``.
* ``UpstreamPool`` keeps idle connections per upstream, newest first (LIFO:
  warm connections are reused, surplus ones age out). An idle connection the
  plugin closed is noticed by ``connection_lost`` and dropped from the pool. One
  idle for longer than ``idle_timeout`` (default 4 s, below uvicorn's 5 s
  keep-alive timeout, so the proxy lets go before the plugin does) is closed
  rather than reused. A connection is only pooled after a complete, well-framed
  exchange; anything unusual (extra bytes, an error, an abort) closes it.
* Connecting retries refused connections with short backoff for
  ``retry_window`` seconds: a plugin being restarted comes back within it.
  Nothing has been sent on a connection that failed to open, so this is safe.
"""

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

from ._http11 import (
    CHUNKED,
    LENGTH,
    MAX_CHUNK_LINE,
    MAX_HEAD_BYTES,
    NO_BODY,
    ResponseHead,
    parse_chunk_size,
    parse_response_head,
)
from ._types import Receive
from .errors import ProxyError, UpstreamProtocolError, UpstreamTimeout, UpstreamUnavailable
from .routing import Upstream

T = TypeVar("T")

# How often the pool's ticker checks in-flight exchanges for timeouts and slowness.
TICK = 0.05
# How long an exchange runs before a task starts watching for the client going away.
WATCH_DELAY = 0.05

HIGH_WATER = 512 * 1024
LOW_WATER = 128 * 1024
MAX_TRAILER_BYTES = 16 * 1024

# Connection states.
_IDLE, _HEAD, _BODY, _DONE = range(4)
# Chunked-body sub-states.
_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection to a plugin, carrying one exchange at a time."""

    def __init__(self, pool: "UpstreamPool", upstream: Upstream) -> None:
        self._pool = pool
        self.upstream = upstream
        self._address = upstream.address
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._state = _IDLE
        self._head_request = False
        self._buf = b""
        self.head: ResponseHead | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._framing = NO_BODY
        self._remaining = 0
        self._chunk_state = _SIZE
        self._trailer_bytes = 0
        self._complete = False
        self._clean = True
        self.request_complete = False
        self.received_any = False
        self._error: ProxyError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0
        self._client: Receive | None = None
        self._watch_at = 0.0
        self._watcher: asyncio.Future[None] | None = None
        self.client_gone = False
        self._write_paused = False
        self._read_paused = False
        self._secret = b""
        self.secret_in_head = False

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool._forget(self)
        if self._state == _BODY and self._framing not in (LENGTH, CHUNKED, NO_BODY) and exc is None:
            self._finish()  # UNTIL_CLOSE: a clean close is the end of the body; a reset is not
        elif self._state in (_HEAD, _BODY) and self._error is None:
            when = "before responding" if self._state == _HEAD else "in the middle of its response"
            self._error = UpstreamUnavailable(f"the plugin closed the connection {when}")
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self._state == _BODY:
            self._feed_body(data)
        elif self._state == _HEAD:
            self.received_any = True
            buf = self._buf
            if buf:
                self._feed_head(buf + data, max(len(buf) - 3, 0))  # never rescan what was already searched
            else:
                self._feed_head(data)
        else:
            # Bytes when no response is due: a plugin bug or a late body. Never reuse.
            self._clean = False
            self.abort()

    # -- parsing ----------------------------------------------------------

    def _fail(self, message: str) -> None:
        self._error = UpstreamProtocolError(message)
        self._wake()
        self.abort()

    def _feed_head(self, data: bytes, searched: int = 0) -> None:
        while True:
            end = data.find(b"\r\n\r\n", searched)
            if end < 0 or end > MAX_HEAD_BYTES:
                if len(data) > MAX_HEAD_BYTES:
                    return self._fail("the plugin's response head is too large")
                self._buf = data
                return
            searched = 0
            try:
                head = parse_response_head(data[:end], head_request=self._head_request)
            except ValueError as exc:
                return self._fail(f"the plugin sent an invalid response ({exc})")
            if self._secret and data.find(self._secret, 0, end) >= 0:
                self.secret_in_head = True
            data = data[end + 4 :]
            if head.status == 101:
                return self._fail("the plugin switched protocols without being asked to")
            if head.status >= 200:
                break
            # 1xx interim responses (100, 102, 103) are not forwarded; read on.
        self._buf = b""
        self.head = head
        self._framing = head.framing
        if head.framing == LENGTH:
            remaining = head.content_length or 0
            if len(data) == remaining:
                # The usual small response: the whole body came with the head. Complete the
                # exchange in one step (what _feed_body, _push and _finish would do, one wake-up).
                self._state = _DONE
                self._complete = True
                if data:
                    self._chunks.append(data)
                    self._buffered += remaining
                self._wake()
                return
            self._remaining = remaining
        self._state = _BODY
        self._chunk_state = _SIZE
        if head.framing == NO_BODY or (head.framing == LENGTH and self._remaining == 0):
            self._finish()
            if data:
                self._clean = False  # a body where none may be: never reuse
        elif data:
            self._feed_body(data)
        self._wake()

    def _feed_body(self, data: bytes) -> None:
        framing = self._framing
        if framing == LENGTH:
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                self._push(data)
                return
            if len(data) > remaining:
                self._clean = False
                data = data[:remaining]
            self._remaining = 0
            self._push(data)
            self._finish()
        elif framing == CHUNKED:
            self._feed_chunked(self._buf + data if self._buf else data)
        else:
            self._push(data)

    def _feed_chunked(self, data: bytes) -> None:
        self._buf = b""
        pos, size = 0, len(data)
        while pos < size:
            state = self._chunk_state
            if state == _DATA:
                take = min(self._remaining, size - pos)
                self._push(data if take == size else data[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._chunk_state = _DATA_END
                continue
            if state == _DATA_END:
                if size - pos < 2:
                    self._buf = data[pos:]
                    return
                if data[pos : pos + 2] != b"\r\n":
                    return self._fail("the plugin sent a malformed chunked body")
                pos += 2
                self._chunk_state = _SIZE
                continue
            eol = data.find(b"\r\n", pos)
            longest = MAX_CHUNK_LINE if state == _SIZE else MAX_TRAILER_BYTES  # a trailer field is a field line
            if eol < 0 or eol - pos > longest:
                if size - pos > longest:
                    return self._fail("the plugin sent a malformed chunked body")
                self._buf = data[pos:]
                return
            line = data[pos:eol]
            pos = eol + 2
            if state == _SIZE:
                try:
                    self._remaining = parse_chunk_size(line)
                except ValueError:
                    return self._fail("the plugin sent a malformed chunked body")
                self._chunk_state = _DATA if self._remaining else _TRAILER
            elif line:
                # Trailer fields are read and dropped (ASGI has no portable way to send them).
                self._trailer_bytes += len(line)
                if self._trailer_bytes > MAX_TRAILER_BYTES:
                    return self._fail("the plugin sent too many trailer fields")
            else:
                if pos < size:
                    self._clean = False
                return self._finish()

    def _push(self, chunk: bytes) -> None:
        if chunk:
            self._chunks.append(chunk)
            self._buffered += len(chunk)
            if self._buffered > HIGH_WATER and not self._read_paused and self._transport is not None:
                self._read_paused = True
                self._transport.pause_reading()
            self._wake()

    def _finish(self) -> None:
        self._state = _DONE
        self._complete = True
        self._wake()

    # -- the exchange, as the proxy's task sees it --------------------------

    def begin(self, *, head_request: bool, secret: bytes = b"") -> None:
        """Start a new exchange on this connection.

        ``secret`` (the internal token the request carried) is looked for in the response
        head, one scan of the bytes as they are parsed: ``secret_in_head`` says if it may be
        there. Only its last 16 bytes are searched for (a JWT ends in about 90 random bits of its
        signature): a short needle costs little to set up, a 280-byte one a pass over itself.
        """
        self._state = _HEAD
        self._head_request = head_request
        self._secret = secret[-16:]
        self.secret_in_head = False
        self.head = None
        self._complete = False
        self._trailer_bytes = 0
        self.request_complete = False
        self.received_any = False
        self.client_gone = False
        self._pool._track(self)

    def watch_client(self, receive: Receive) -> None:
        """Watch ``receive`` for the client going away once this exchange is older than ``WATCH_DELAY``.

        Call it only once the whole request has been read from ``receive``.
        """
        self._client = receive
        self._watch_at = time.monotonic() + WATCH_DELAY

    def _tick(self, now: float) -> None:
        waiter = self._waiter
        if waiter is not None and now >= self._deadline:
            self._waiter = None
            if not waiter.done():
                waiter.set_exception(UpstreamTimeout("the plugin did not answer within the route's read_timeout"))
        receive = self._client
        if receive is not None and now >= self._watch_at:
            self._client = None
            self._watcher = asyncio.ensure_future(self._watch(receive), loop=self._loop)

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass  # request body the plugin answered without reading: nobody wants it
        self._watcher = None
        self.client_gone = True
        self.abort()

    def _end(self) -> None:
        """The exchange is over: stop watching it."""
        self._pool._busy.discard(self)
        self._client = None
        watcher = self._watcher
        if watcher is not None:
            self._watcher = None
            watcher.cancel()

    def write(self, data: bytes) -> None:
        if self.closed or self._transport is None:
            raise self._closed_error()
        try:
            self._transport.write(data)
        except RuntimeError:  # uvloop: the handle closed before connection_lost was delivered
            raise self._closed_error() from None

    def writelines(self, data: list[bytes]) -> None:
        if self.closed or self._transport is None:
            raise self._closed_error()
        try:
            self._transport.writelines(data)
        except RuntimeError:
            raise self._closed_error() from None

    def _closed_error(self) -> ProxyError:
        return self._error or UpstreamUnavailable("the plugin closed the connection")

    async def drain(self, timeout: float) -> None:
        """Wait while the plugin is not taking the request body, until it does or answers.

        Fails like ``wait`` when the plugin takes nothing for ``timeout`` seconds.
        """
        while self._write_paused and not self.closed and self.head is None:
            await self.wait(timeout)
        if self.closed and self.head is None:
            raise self._error or UpstreamUnavailable("the plugin closed the connection")

    def wait(self, timeout: float) -> "asyncio.Future[None]":
        """A future that completes when the exchange moves on, or fails after ``timeout`` seconds.

        Raises the exchange's error instead, if it already has one. The proxy awaits
        this directly (no coroutine in between: each await level costs on every resume).
        """
        if self._error is not None:
            raise self._error
        self._deadline = time.monotonic() + timeout
        waiter = self._waiter = self._loop.create_future()
        return waiter

    def next_body(self) -> tuple[bytes, bool] | None:
        """The next piece of body and whether more follows, or ``None`` if none has arrived yet."""
        chunks = self._chunks
        if chunks:
            chunk = chunks.popleft() if len(chunks) == 1 else self._take_all()
            self._buffered -= len(chunk)
            if self._read_paused and self._buffered < LOW_WATER and self._transport is not None:
                self._read_paused = False
                self._transport.resume_reading()
            return chunk, not self._complete
        if self._complete:
            return b"", False
        if self._error is not None:
            raise self._error
        return None

    def _take_all(self) -> bytes:
        chunk = b"".join(self._chunks)
        self._chunks.clear()
        return chunk

    @property
    def reusable(self) -> bool:
        head = self.head
        return (
            self._complete
            and self._clean
            and self.request_complete
            and not self.closed
            and head is not None
            and head.keep_alive
            and not self._chunks
        )

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def abort(self) -> None:
        """Close now, discarding buffers; used on errors and when the client goes away."""
        self._clean = False
        if self._transport is not None and not self.closed:
            self._transport.abort()
        self.closed = True
        self._pool._forget(self)
        self._end()


async def retry_refused(open_connection: Callable[[], Awaitable[T]], *, retry_window: float) -> T:
    """Call ``open_connection`` until it succeeds, retrying failures for ``retry_window`` seconds.

    Refused, reset, no such socket, unreachable: nothing reached the plugin, so
    retrying is safe. Backoff starts at 25 ms and doubles up to 250 ms. A timeout
    is not retried: it already took ``connect_timeout``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_window
    delay = 0.025
    while True:
        try:
            return await open_connection()
        except TimeoutError:
            raise UpstreamTimeout("the plugin did not accept the connection within connect_timeout") from None
        except OSError as exc:
            if loop.time() + delay > deadline:
                raise UpstreamUnavailable("the plugin is not accepting connections") from exc
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.25)


class UpstreamPool:
    """Keep-alive connections to plugins, per upstream.

    ``idle_timeout`` should stay below the plugin server's keep-alive timeout
    (uvicorn: 5 s) so that the proxy, not the plugin, closes idle connections.
    """

    def __init__(self, *, idle_timeout: float = 4.0, max_idle_per_upstream: int = 64) -> None:
        if not idle_timeout > 0:
            raise ValueError("idle_timeout must be a positive number of seconds")
        if max_idle_per_upstream < 0:
            raise ValueError("max_idle_per_upstream must be >= 0")
        self.idle_timeout = idle_timeout
        self.max_idle_per_upstream = max_idle_per_upstream
        self._idle: dict[str, list[Connection]] = {}  # by Upstream.address
        self._busy: set[Connection] = set()  # exchanges in progress
        self._ticker: asyncio.TimerHandle | None = None
        self._ticker_loop: asyncio.AbstractEventLoop | None = None

    def idle_count(self) -> int:
        return sum(len(conns) for conns in self._idle.values())

    def busy_count(self) -> int:
        """Connections carrying an exchange now."""
        return len(self._busy)

    def take_idle(self, upstream: Upstream) -> Connection | None:
        """A pooled connection to ``upstream`` that is still open and fresh, if there is one."""
        idle = self._idle.get(upstream.address)
        if idle:
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < self.idle_timeout:
                    conn.reused = True
                    return conn
                conn.abort()
        return None

    async def connect(self, upstream: Upstream, *, connect_timeout: float, retry_window: float) -> Connection:
        """Open a new connection, retrying failed attempts for ``retry_window`` seconds."""
        loop = asyncio.get_running_loop()

        def factory() -> Connection:
            return Connection(self, upstream)

        async def open_connection() -> Connection:
            async with asyncio.timeout(connect_timeout):
                if upstream.unix_path:
                    _, conn = await loop.create_unix_connection(factory, upstream.unix_path)
                else:
                    _, conn = await loop.create_connection(factory, upstream.host.strip("[]"), upstream.port)
            return conn

        return await retry_refused(open_connection, retry_window=retry_window)

    def release(self, conn: Connection) -> None:
        """Return a connection after its exchange; it is pooled only if it is clean."""
        if not conn.reusable:
            conn.abort()
            return
        conn._end()
        conn._state = _IDLE
        conn.idle_since = time.monotonic()
        idle = self._idle.setdefault(conn._address, [])
        if len(idle) >= self.max_idle_per_upstream:
            conn.abort()
            return
        idle.append(conn)

    def _forget(self, conn: Connection) -> None:
        idle = self._idle.get(conn._address)
        if idle and conn in idle:
            idle.remove(conn)

    def _track(self, conn: Connection) -> None:
        """Count ``conn`` as in flight; make sure the ticker runs on its loop."""
        self._busy.add(conn)
        if self._ticker is None or self._ticker_loop is not conn._loop:
            self._ticker_loop = conn._loop
            self._ticker = conn._loop.call_later(TICK, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        for conn in list(self._busy):
            conn._tick(now)
        loop = self._ticker_loop
        self._ticker = loop.call_later(TICK, self._tick) if self._busy and loop is not None else None

    def close(self) -> None:
        """Close every idle connection."""
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.abort()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
