"""The upstream client: a lean keep-alive HTTP/1.1 connection pool over asyncio.

Theory of operation
-------------------
This module is the seam between the proxy and the plugin processes; the
proxy's speed lives here, so it is kept small and free of abstractions that
cost per request.

* ``Connection`` is an ``asyncio.Protocol`` that moves bytes; ``_http11`` reads
  them. ``begin`` starts an exchange and sends the request (``send_body`` the
  rest of a streamed body). ``data_received`` hands each read to ``read_head``,
  then to the body's reader (``_http11.body_reader``), and queues the body
  pieces; the proxy's task waits with ``wait`` (a bare future, no coroutine in
  between) and takes them with ``next_body``. Nothing is ever joined into a
  whole body: a piece is passed on as it came, and pieces that queued up while
  the client was slower (never more than ``HIGH_WATER`` bytes) go out joined in
  one send. The connection's own state (transport, ``closed``, ``reused``, flow
  control) outlives exchanges; ``begin`` sets the exchange's anew.
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
  (so a timeout fires up to ``TICK`` late) and starts the task an exchange
  asked for with ``when_slow`` once it has run one to two ``TICK`` periods (the proxy's
  client watch, ``_disconnect``: most exchanges are over by then and never pay
  for a task). The connection cancels that task when the exchange ends.
* The hot path never calls ``asyncio.get_running_loop()``: CPython checks the
  process id on every call, a ``getpid`` syscall each time. Connections keep
  their loop; the pool's clock is ``time.monotonic()``.
* ``UpstreamPool`` keeps idle connections per upstream, newest first (LIFO:
  warm connections are reused, surplus ones age out). Its interface with a
  connection is small: the connection calls ``track`` when an exchange starts and
  ``forget`` when it closes; the pool calls ``tick``, ``end_exchange`` and ``abort``.
  An idle connection the plugin closed is dropped from the pool. One idle for
  longer than ``idle_timeout`` (default 4 s, below uvicorn's 5 s keep-alive
  timeout, so the proxy lets go before the plugin does) is closed rather than
  reused. A connection is only pooled after a complete, well-framed exchange;
  anything unusual (extra bytes, an error, an abort) closes it.
* Retries. Connecting retries refused connections with short backoff for
  ``retry_window`` seconds (``retry_refused``): a plugin being restarted comes
  back within it, and nothing has been sent on a connection that failed to open.
  Whether a request that failed on an open connection may be sent again is
  ``may_retry``'s decision, the only one.
"""

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

from ._http11 import LENGTH, MAX_HEAD_BYTES, BodyReader, ResponseHead, body_reader, read_head
from .errors import ProxyError, UpstreamProtocolError, UpstreamTimeout, UpstreamUnavailable
from .routing import Upstream

T = TypeVar("T")
A = TypeVar("A")

# How often the pool's ticker checks in-flight exchanges for timeouts and slowness.
TICK = 0.05

HIGH_WATER = 512 * 1024
LOW_WATER = 128 * 1024

# What the connection expects from the plugin next.
_NOTHING, _HEAD, _BODY = range(3)

# Methods whose request may be sent twice with the effect of once (RFC 9110 §9.2.2).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection to a plugin, carrying one exchange at a time.

    Its own state outlives exchanges: the transport, ``closed``, ``reused``, ``idle_since``,
    flow control and whether anything ever went wrong on it (``_clean``). Everything about the
    current exchange (the response read so far, its reader, the waiter, the error) is set
    anew by ``begin``. Parsing is ``_http11``'s; this class moves bytes and wakes the proxy.
    """

    def __init__(self, pool: "UpstreamPool", upstream: Upstream) -> None:
        self._pool = pool
        self.upstream = upstream
        self.loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._clean = True  # nothing unusual ever happened: the connection may be pooled
        self._write_paused = False
        self._read_paused = False
        # Body pieces not yet taken (empty between exchanges of a pooled connection).
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._expect = _NOTHING
        self._head_request = False
        self._secret = b""
        self.secret_in_head = False
        self._buf = bytearray()  # a head not all read yet, grown in place
        self.head: ResponseHead | None = None
        self._reader: BodyReader | None = None
        self.request_complete = False
        self.received_any = False
        self._error: ProxyError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0
        self._on_slow: Callable[[Connection, Any], Coroutine[Any, Any, None]] | None = None
        self._slow_arg: object = None
        self._slow_ticks = 0
        self._slow_task: asyncio.Task[None] | None = None

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        expect = self._expect
        if expect == _NOTHING or self._error is not None:
            pass
        elif expect == _BODY and exc is None and self._ends_at_close():
            self._expect = _NOTHING  # a body read until close: this is its end
        else:
            when = "before responding" if expect == _HEAD else "in the middle of its response"
            self._error = UpstreamUnavailable(f"the plugin closed the connection {when}")
        self._wake()

    def _ends_at_close(self) -> bool:
        assert self._reader is not None
        try:
            self._reader.read_eof()
        except ValueError:
            return False
        return True

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    def data_received(self, data: bytes) -> None:
        expect = self._expect
        if expect == _BODY:
            self._feed_body(data)
            return
        if expect != _HEAD:
            # Bytes when no response is due: a plugin bug or a late body. Never reuse.
            self.abort()
            return
        # The head (read here, not in a method of its own: this runs once per exchange).
        self.received_any = True
        buf = self._buf
        searched = 0
        if buf:
            # A head in several reads grows in place and is read once its end (or the size
            # limit) is there: linear however small the pieces, never a copy per read.
            searched = max(len(buf) - 3, 0)
            buf += data
            if buf.find(b"\r\n\r\n", searched) < 0 and len(buf) <= MAX_HEAD_BYTES:
                return
            data = bytes(buf)
        try:
            head, start = read_head(data, searched, self._head_request)
        except ValueError as exc:
            return self._fail(f"the plugin sent an invalid response ({exc})")
        if self._secret and data.find(self._secret, 0, start) >= 0:
            self.secret_in_head = True
        if head is None:
            if buf:
                del buf[:start]  # (the interim heads before ``start`` are done with)
            else:
                buf += data[start:]
            return
        if buf:
            buf.clear()
        self.head = head
        if head.framing == LENGTH and len(data) - start == head.content_length:
            # The usual small response: the whole body came with the head. What the
            # ContentLengthReader would say, in one step (tests/test_upstream.py pins the two together).
            self._expect = _NOTHING
            if start < len(data):
                body = data[start:]
                self._chunks.append(body)
                self._buffered += len(body)
            waiter = self._waiter  # (``_wake``, inline: this runs once per exchange)
            if waiter is not None:
                self._waiter = None
                if not waiter.done():
                    waiter.set_result(None)
            return
        self._reader = body_reader(head)
        self._expect = _BODY
        self._feed_body(data[start:] if start < len(data) else b"")
        self._wake()

    def _fail(self, message: str) -> None:
        self._error = UpstreamProtocolError(message)
        self._wake()
        self.abort()

    def _feed_body(self, data: bytes) -> None:
        assert self._reader is not None
        try:
            body, rest = self._reader(data)
        except ValueError as exc:
            return self._fail(f"the plugin sent an invalid response body ({exc})")
        if body:
            self._push(body)
        if rest is not None:
            if rest:
                self._clean = False  # more than the response: never reuse
            self._expect = _NOTHING
            self._wake()

    def _push(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > HIGH_WATER and not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()
        self._wake()

    # -- the exchange, as the proxy's task sees it --------------------------

    def begin(self, request: bytes, complete: bool, head_request: bool, secret: bytes = b"") -> None:
        """Start a new exchange on this connection: send ``request``, its head and the body there is.

        ``complete``: ``request`` is the whole request; else the rest of the body follows with
        ``send_body``. ``secret`` (what marks an internal token, ``Forward.token_mark``: the tail of the JWT
        header every token of the issuer starts with) is looked for in the response head, one scan
        of the bytes as they are parsed: ``secret_in_head`` says if it may be there. Only its last
        16 bytes are searched for: a short needle costs little to set up.
        """
        self._expect = _HEAD
        self._head_request = head_request
        self._secret = secret[-16:]
        self.secret_in_head = False
        self.head = None
        self._reader = None
        self.request_complete = complete
        self.received_any = False
        self._on_slow = None
        self._pool.track(self)
        if self.closed or self._transport is None:
            raise self._closed_error()
        try:
            self._transport.write(request)
        except RuntimeError:  # uvloop: the handle closed before connection_lost was delivered
            raise self._closed_error() from None

    def send_body(self, pieces: list[bytes], *, last: bool) -> None:
        """Send more of the request body (``last``: the request is now complete)."""
        if self.closed or self._transport is None:
            raise self._closed_error()
        try:
            self._transport.writelines(pieces)
        except RuntimeError:
            raise self._closed_error() from None
        self.request_complete = last

    def _closed_error(self) -> ProxyError:
        return self._error or UpstreamUnavailable("the plugin closed the connection")

    def when_slow(self, task: Callable[["Connection", A], Coroutine[Any, Any, None]], arg: A) -> None:
        """Run ``task(self, arg)`` alongside this exchange if it is still on one to two ``TICK`` periods from now.

        The pool's ticker starts it: no timer per exchange, and most exchanges are over by
        then. The task is cancelled when the exchange ends (``end_exchange`` or ``abort``).
        """
        self._on_slow = task
        self._slow_arg = arg
        self._slow_ticks = 0

    def tick(self, now: float) -> None:
        """The pool's ticker: expire an overdue wait, and call a callback this exchange is slow for."""
        waiter = self._waiter
        if waiter is not None and now >= self._deadline:
            self._waiter = None
            if not waiter.done():
                waiter.set_exception(UpstreamTimeout("the plugin did not answer within the route's read_timeout"))
        on_slow = self._on_slow
        if on_slow is not None:
            self._slow_ticks += 1
            if self._slow_ticks == 2:  # (registered between the previous tick and the one before)
                self._on_slow = None
                self._slow_task = self.loop.create_task(on_slow(self, self._slow_arg))

    async def drain(self, timeout: float) -> None:
        """Wait while the plugin is not taking the request body, until it does or answers.

        Fails like ``wait`` when the plugin takes nothing for ``timeout`` seconds.
        """
        while self._write_paused and not self.closed and self.head is None:
            await self.wait(timeout)
        if self.closed and self.head is None:
            raise self._closed_error()

    def wait(self, timeout: float) -> "asyncio.Future[None]":
        """A future that completes when the exchange moves on, or fails after ``timeout`` seconds.

        Raises the exchange's error instead, if it already has one. The proxy awaits
        this directly (no coroutine in between: each await level costs on every resume).
        """
        if self._error is not None:
            raise self._error
        self._deadline = time.monotonic() + timeout
        waiter = self._waiter = self.loop.create_future()
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
            return chunk, self._expect != _NOTHING
        if self._expect == _NOTHING:
            return b"", False
        if self._error is not None:
            raise self._error
        return None

    def _take_all(self) -> bytes:
        chunk = b"".join(self._chunks)
        self._chunks.clear()
        return chunk

    def end_exchange(self) -> bool:
        """The exchange is over: stop its task (``when_slow``). Whether the connection may carry another.

        Only when the whole request went out, the whole response came in, nothing unusual ever
        happened on it, and the plugin keeps it alive.
        """
        self._on_slow = None
        if self._slow_task is not None:
            self._stop_slow_task()
        head = self.head
        return (
            self._expect == _NOTHING
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

    def _stop_slow_task(self) -> None:
        task = self._slow_task
        self._slow_task = None
        if task is not None and task is not asyncio.current_task(self.loop):
            task.cancel()

    def abort(self, error: ProxyError | None = None) -> None:
        """Close now, discarding buffers: on errors, and when nobody wants the response any more.

        ``error``: what the exchange fails with, unless it already failed otherwise than by the
        plugin closing the connection (the client leaving wins over that: an exchange nobody
        waits for is never sent again, whichever of the two the loop delivered first).
        """
        self._clean = False
        if error is not None and (self._error is None or type(self._error) is UpstreamUnavailable):
            self._error = error
            self._wake()
        if self._transport is not None and not self.closed:
            self._transport.abort()
        self.closed = True
        self._pool.forget(self)
        self._on_slow = None
        if self._slow_task is not None:
            self._stop_slow_task()


def may_retry(error: ProxyError, method: str, *, reused: bool, received_any: bool, whole: bool) -> bool:
    """Whether a failed exchange may be sent again, on a new connection.

    Only when the plugin closed the connection before any answer and nothing can have come of
    the request: ``error`` is ``UpstreamUnavailable`` (not a timeout, not the client leaving:
    nobody waits for that answer), the connection was a pooled one (a plugin may close an idle
    connection just as the proxy takes it; a new one failing is a real failure), nothing at
    all came back on it, the ``whole`` request went out in one write (a body that streamed
    through is no longer in hand), and the method is idempotent (RFC 9110 §9.2.2: a plugin
    that crashed after reading a POST must not get it twice).
    """
    return (
        isinstance(error, UpstreamUnavailable)
        and reused
        and not received_any
        and whole
        and method in IDEMPOTENT_METHODS
    )


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

    def take_idle(self, upstream: Upstream, now: float) -> Connection | None:
        """A pooled connection to ``upstream`` still open and fresh at ``now`` (``time.monotonic()``), if any."""
        idle = self._idle.get(upstream.address)
        if idle:
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
        self._busy.discard(conn)
        if not conn.end_exchange():
            conn.abort()
            return
        idle = self._idle.setdefault(conn.upstream.address, [])
        if len(idle) >= self.max_idle_per_upstream:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def track(self, conn: Connection) -> None:
        """``conn`` carries an exchange now: tick it until it is released or forgotten."""
        self._busy.add(conn)
        if self._ticker is None or self._ticker_loop is not conn.loop:
            self._ticker_loop = conn.loop
            self._ticker = conn.loop.call_later(TICK, self._tick)

    def forget(self, conn: Connection) -> None:
        """``conn`` closed: it is neither busy nor idle any more."""
        self._busy.discard(conn)
        idle = self._idle.get(conn.upstream.address)
        if idle and conn in idle:
            idle.remove(conn)

    def _tick(self) -> None:
        now = time.monotonic()
        for conn in list(self._busy):
            conn.tick(now)
        loop = self._ticker_loop
        self._ticker = loop.call_later(TICK, self._tick) if self._busy and loop is not None else None

    def close(self) -> None:
        """Close every idle connection.

        Exchanges still in flight (a server shutting down gracefully lets them finish) keep
        their timeouts: the ticker stops by itself once the last of them ends.
        """
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.abort()
        if self._ticker is not None and not self._busy:
            self._ticker.cancel()
            self._ticker = None
