"""The upstream ``Connection`` driven without sockets, the retry decision and the client watch.

The ``Connection`` tests feed bytes through ``data_received`` exactly as asyncio would, split every
way the network might split them, into a fake transport that only records what the protocol asks
of it. The framing itself is ``_http11``'s, tested over bytes in ``tests/test_http11.py``; here:
what the connection makes of it (errors, reuse), flow control, waits and timeouts.
"""

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from mint_proxy._disconnect import ClientGone, watch_client
from mint_proxy._http11 import MAX_TRAILER_BYTES, UNTIL_CLOSE, ContentLengthReader
from mint_proxy._upstream import (
    HIGH_WATER,
    IDEMPOTENT_METHODS,
    LOW_WATER,
    TICK,
    Connection,
    UpstreamPool,
    may_retry,
)
from mint_proxy.errors import ProxyError, UpstreamProtocolError, UpstreamTimeout, UpstreamUnavailable
from mint_proxy.routing import Upstream

from .utils import upstream_body, upstream_head


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _ConnTransport(asyncio.Transport):
    """Records what the protocol asks of its transport; delivers nothing by itself."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.aborted = False
        self.pauses = 0
        self.resumes = 0

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def writelines(self, list_of_data: Iterable[Any]) -> None:
        self.writes.extend(bytes(data) for data in list_of_data)

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.pauses += 1

    def resume_reading(self) -> None:
        self.resumes += 1


class _ConnClosedHandleTransport(_ConnTransport):
    """uvloop's transport between the handle closing and ``connection_lost`` arriving: writes raise."""

    def write(self, data: Any) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

    def writelines(self, list_of_data: Iterable[Any]) -> None:
        self.write(b"")


def _conn_new(transport: _ConnTransport | None = None, pool: UpstreamPool | None = None) -> Connection:
    conn = Connection(pool or UpstreamPool(), Upstream.parse("http://127.0.0.1:1"))
    conn.connection_made(transport or _ConnTransport())
    return conn


def _conn_open(*, head_request: bool = False, complete: bool = True) -> tuple[Connection, _ConnTransport]:
    """A connection that has just sent a request and awaits the response."""
    transport = _ConnTransport()
    conn = _conn_new(transport)
    conn.begin(b"GET / HTTP/1.1\r\n\r\n", complete=complete, head_request=head_request)
    return conn, transport


def _conn_feed(conn: Connection, transport: _ConnTransport, data: bytes, split: int) -> None:
    """Deliver ``data`` in pieces of ``split`` bytes (0: all at once), stopping once aborted as asyncio does."""
    size = split or len(data) or 1
    for start in range(0, len(data), size):
        if transport.aborted:
            return
        conn.data_received(data[start : start + size])


async def _conn_read_all(conn: Connection) -> bytes:
    chunks = []
    more = True
    while more:
        chunk, more = await upstream_body(conn, 1)
        chunks.append(chunk)
    return b"".join(chunks)


# Every test marked so runs with the bytes split every way the network might split them.
_conn_by_split = pytest.mark.parametrize("split", [1, 2, 3, 7, 0], ids=["1", "2", "3", "7", "whole"])

_CONN_CL_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\nhello world"
_CONN_CHUNKED_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;name=value\r\nhello\r\n"
    b"6 ; x\r\n world\r\n"
    b"0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n"
)


# --- Connection: reading the response ----------------------------------------------------------


@pytest.mark.anyio
@_conn_by_split
@pytest.mark.parametrize("response", [_CONN_CL_RESPONSE, _CONN_CHUNKED_RESPONSE], ids=["cl", "chunked"])
async def test_response_is_read_into_head_and_body(response: bytes, split: int) -> None:
    conn, transport = _conn_open()

    _conn_feed(conn, transport, response, split)
    head = await upstream_head(conn, 1)

    assert head.status == 200
    assert await _conn_read_all(conn) == b"hello world"


@pytest.mark.anyio
@_conn_by_split
async def test_head_response_body_is_one_empty_last_piece(split: int) -> None:
    conn, transport = _conn_open(head_request=True)

    _conn_feed(conn, transport, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", split)
    await upstream_head(conn, 1)

    assert await upstream_body(conn, 1) == (b"", False)


@pytest.mark.anyio
@_conn_by_split
@pytest.mark.parametrize(
    ("response", "match"),
    [
        pytest.param(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\nraw", "101", id="101"),
        pytest.param(b"HTTP/1.1 200 OK\r\nBad Header: 1\r\nContent-Length: 0\r\n\r\n", "invalid", id="bad-head"),
    ],
)
async def test_invalid_head_is_a_protocol_error_and_aborts(response: bytes, match: str, split: int) -> None:
    conn, transport = _conn_open()

    _conn_feed(conn, transport, response, split)

    with pytest.raises(UpstreamProtocolError, match=match):
        await upstream_head(conn, 1)
    assert transport.aborted


@pytest.mark.anyio
@pytest.mark.parametrize("split", [4096, 0], ids=["4096", "whole"])
async def test_head_over_the_limit_is_a_protocol_error_however_it_arrives(split: int) -> None:
    conn, transport = _conn_open()
    response = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 2 * 64 * 1024 + b"\r\nContent-Length: 0\r\n\r\n"

    _conn_feed(conn, transport, response, split)

    with pytest.raises(UpstreamProtocolError, match="too large"):
        await upstream_head(conn, 1)
    assert transport.aborted


@pytest.mark.anyio
@_conn_by_split
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"zz\r\nhello\r\n0\r\n\r\n", id="size-not-hex"),
        pytest.param(b"5\r\nhelloXX0\r\n\r\n", id="no-crlf-after-data"),
        pytest.param(b"0\r\nx-t: " + b"v" * (MAX_TRAILER_BYTES + 1) + b"\r\n\r\n", id="trailers-too-large"),
    ],
)
async def test_invalid_chunked_body_is_a_protocol_error_and_aborts(body: bytes, split: int) -> None:
    conn, transport = _conn_open()

    _conn_feed(conn, transport, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body, split)
    await upstream_head(conn, 1)

    with pytest.raises(UpstreamProtocolError, match="chunk|trailer"):
        await _conn_read_all(conn)
    assert transport.aborted
    assert not conn.end_exchange()


@pytest.mark.anyio
async def test_trailer_limit_applies_to_each_exchange() -> None:
    conn, transport = _conn_open()
    trailers = b"".join(b"x-t%d: %s\r\n" % (i, b"v" * 500) for i in range(MAX_TRAILER_BYTES // 500 // 2 + 1))
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n" + trailers + b"\r\n"

    for _ in range(3):  # three exchanges on one kept-alive connection, each within the limit on its own
        _conn_feed(conn, transport, response, 0)
        await upstream_head(conn, 1)
        assert await _conn_read_all(conn) == b"ok"
        assert conn.end_exchange()
        conn.begin(b"GET / HTTP/1.1\r\n\r\n", complete=True, head_request=False)


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=40),
    extra=st.binary(max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=120), max_size=4),
)
def test_whole_body_with_the_head_ends_as_the_content_length_reader_says(
    body: bytes, extra: bytes, cuts: list[int]
) -> None:
    """The connection's shortcut for a body that came whole with its head (no reader) and the
    general path (a ``ContentLengthReader``, for any other way the bytes arrive) agree on the
    body, on its end, and on whether the connection may be reused."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    response = head + body + extra
    reader = ContentLengthReader(len(body))
    expected_body, rest = reader(response[len(head) :])

    async def read() -> tuple[bytes, bool]:
        conn, transport = _conn_open()
        points = sorted({min(cut, len(response)) for cut in cuts} | {0, len(response)})
        for start, end in zip(points, points[1:], strict=False):
            if not transport.aborted:
                conn.data_received(response[start:end])
        await upstream_head(conn, 1)
        return await _conn_read_all(conn), conn.end_exchange()

    assert asyncio.run(read()) == (expected_body, rest == b"")


# --- Connection: reuse -------------------------------------------------------------------------


@pytest.mark.anyio
@_conn_by_split
@pytest.mark.parametrize("response", [_CONN_CL_RESPONSE, _CONN_CHUNKED_RESPONSE], ids=["cl", "chunked"])
async def test_clean_complete_exchange_is_reusable(response: bytes, split: int) -> None:
    conn, transport = _conn_open()

    _conn_feed(conn, transport, response, split)
    await upstream_head(conn, 1)
    await _conn_read_all(conn)

    assert conn.end_exchange()
    assert not transport.aborted


@pytest.mark.anyio
async def test_exchange_is_not_reusable_until_the_request_is_complete() -> None:
    conn, transport = _conn_open(complete=False)

    _conn_feed(conn, transport, _CONN_CL_RESPONSE, 0)
    await upstream_head(conn, 1)
    await _conn_read_all(conn)

    assert not conn.end_exchange()


@pytest.mark.anyio
async def test_request_completed_by_its_last_body_piece_is_reusable() -> None:
    conn, transport = _conn_open(complete=False)
    conn.send_body([b"5\r\n", b"hello", b"\r\n0\r\n\r\n"], last=True)

    _conn_feed(conn, transport, _CONN_CL_RESPONSE, 0)
    await upstream_head(conn, 1)
    await _conn_read_all(conn)

    assert transport.writes[-3:] == [b"5\r\n", b"hello", b"\r\n0\r\n\r\n"]
    assert conn.end_exchange()


@pytest.mark.anyio
async def test_exchange_is_not_reusable_while_body_is_unread() -> None:
    conn, transport = _conn_open()

    _conn_feed(conn, transport, _CONN_CL_RESPONSE, 0)
    await upstream_head(conn, 1)

    assert not conn.end_exchange()


@pytest.mark.anyio
@_conn_by_split
@pytest.mark.parametrize(
    ("response", "body"),
    [
        pytest.param(_CONN_CL_RESPONSE + b"junk", b"hello world", id="after-cl-body"),
        pytest.param(_CONN_CHUNKED_RESPONSE + b"junk", b"hello world", id="after-chunked-body"),
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\njunk", b"", id="after-204"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\njunk", b"", id="after-cl-0"),
    ],
)
async def test_extra_bytes_after_a_complete_body_are_not_reusable(response: bytes, body: bytes, split: int) -> None:
    conn, transport = _conn_open()

    _conn_feed(conn, transport, response, split)
    await upstream_head(conn, 1)
    assert await _conn_read_all(conn) == body

    assert not conn.end_exchange()


@pytest.mark.anyio
@_conn_by_split
async def test_connection_close_response_is_not_reusable(split: int) -> None:
    conn, transport = _conn_open()

    _conn_feed(conn, transport, b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", split)
    await upstream_head(conn, 1)
    assert await _conn_read_all(conn) == b"ok"

    assert not conn.end_exchange()


@pytest.mark.anyio
async def test_bytes_when_no_response_is_due_abort_the_connection() -> None:
    transport = _ConnTransport()
    conn = _conn_new(transport)

    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\n")

    assert transport.aborted
    assert conn.closed


# --- Connection: the plugin closing ------------------------------------------------------------


@pytest.mark.anyio
@_conn_by_split
@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\r\n\r\n", b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n"],
    ids=["http-1.1", "http-1.0"],
)
async def test_until_close_body_ends_when_the_plugin_closes(head: bytes, split: int) -> None:
    conn, transport = _conn_open()

    _conn_feed(conn, transport, head + b"all of the body", split)
    assert (await upstream_head(conn, 1)).framing == UNTIL_CLOSE
    conn.connection_lost(None)

    assert await _conn_read_all(conn) == b"all of the body"
    assert not conn.end_exchange()


@pytest.mark.anyio
async def test_until_close_body_cut_by_a_reset_is_unavailable() -> None:
    conn, transport = _conn_open()

    _conn_feed(conn, transport, b"HTTP/1.1 200 OK\r\n\r\npart", 0)
    await upstream_head(conn, 1)
    conn.connection_lost(ConnectionResetError())

    with pytest.raises(UpstreamUnavailable, match="middle of its response"):
        await _conn_read_all(conn)


@pytest.mark.anyio
async def test_close_before_any_byte_is_unavailable_with_nothing_received() -> None:
    conn, _ = _conn_open()

    conn.connection_lost(None)

    with pytest.raises(UpstreamUnavailable, match="before responding"):
        await upstream_head(conn, 1)
    assert conn.received_any is False


@pytest.mark.anyio
@_conn_by_split
async def test_close_in_the_middle_of_the_head_is_unavailable_with_bytes_received(split: int) -> None:
    conn, transport = _conn_open()

    _conn_feed(conn, transport, b"HTTP/1.1 200 OK\r\nContent-Len", split)
    conn.connection_lost(None)

    with pytest.raises(UpstreamUnavailable, match="before responding"):
        await upstream_head(conn, 1)
    assert conn.received_any is True


@pytest.mark.anyio
@_conn_by_split
@pytest.mark.parametrize(
    "response",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", id="cl"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", id="chunked"),
    ],
)
async def test_close_in_the_middle_of_a_framed_body_is_unavailable(response: bytes, split: int) -> None:
    conn, transport = _conn_open()

    _conn_feed(conn, transport, response, split)
    await upstream_head(conn, 1)
    conn.connection_lost(None)

    with pytest.raises(UpstreamUnavailable, match="middle of its response"):
        await _conn_read_all(conn)


# --- Connection: flow control, timeouts, writes ------------------------------------------------


@pytest.mark.anyio
async def test_reading_pauses_once_more_than_high_water_is_buffered() -> None:
    conn, transport = _conn_open()
    _conn_feed(conn, transport, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * HIGH_WATER), 0)
    await upstream_head(conn, 1)

    conn.data_received(b"x" * HIGH_WATER)
    assert transport.pauses == 0
    conn.data_received(b"x")
    assert transport.pauses == 1
    conn.data_received(b"x")
    assert transport.pauses == 1


@pytest.mark.anyio
async def test_reading_resumes_once_drained_below_low_water() -> None:
    conn, transport = _conn_open()
    _conn_feed(conn, transport, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * HIGH_WATER), 0)
    await upstream_head(conn, 1)
    conn.data_received(b"x" * (HIGH_WATER + 1))
    assert (transport.pauses, transport.resumes) == (1, 0)

    chunk, more = await upstream_body(conn, 1)

    assert (len(chunk), more) == (HIGH_WATER + 1, True)
    assert (transport.pauses, transport.resumes) == (1, 1)


@pytest.mark.anyio
async def test_reading_is_not_resumed_when_it_was_never_paused() -> None:
    conn, transport = _conn_open()
    _conn_feed(conn, transport, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * LOW_WATER), 0)
    await upstream_head(conn, 1)
    conn.data_received(b"x" * LOW_WATER)

    await upstream_body(conn, 1)

    assert (transport.pauses, transport.resumes) == (0, 0)


@pytest.mark.anyio
async def test_silent_plugin_before_the_head_is_a_timeout() -> None:
    conn, _ = _conn_open()

    with pytest.raises(UpstreamTimeout):
        await upstream_head(conn, 0.01)


@pytest.mark.anyio
async def test_silent_plugin_in_the_middle_of_the_body_is_a_timeout() -> None:
    conn, transport = _conn_open()
    _conn_feed(conn, transport, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", 0)
    await upstream_head(conn, 1)
    assert await upstream_body(conn, 1) == (b"hello", True)

    with pytest.raises(UpstreamTimeout):
        await upstream_body(conn, 0.01)


@pytest.mark.anyio
async def test_plugin_not_reading_the_request_body_is_a_timeout() -> None:
    conn, _ = _conn_open(complete=False)
    conn.pause_writing()

    with pytest.raises(UpstreamTimeout):
        await conn.drain(0.01)


@pytest.mark.anyio
async def test_draining_ends_when_the_plugin_takes_the_body_again() -> None:
    conn, _ = _conn_open(complete=False)
    conn.pause_writing()
    asyncio.get_running_loop().call_soon(conn.resume_writing)

    await conn.drain(1)


@pytest.mark.anyio
async def test_draining_ends_when_the_plugin_answers_early() -> None:
    conn, transport = _conn_open(complete=False)
    conn.pause_writing()
    asyncio.get_running_loop().call_soon(conn.data_received, b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")

    await conn.drain(1)

    assert conn.head is not None and conn.head.status == 413


@pytest.mark.anyio
async def test_draining_a_closed_connection_is_unavailable() -> None:
    conn, _ = _conn_open(complete=False)
    conn.connection_lost(None)

    with pytest.raises(UpstreamUnavailable):
        await conn.drain(1)


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["begin", "send_body"])
async def test_a_write_racing_the_close_is_an_upstream_error_not_a_runtime_error(method: str) -> None:
    conn = _conn_new(_ConnClosedHandleTransport())
    with pytest.raises(UpstreamUnavailable, match="closed the connection"):
        if method == "begin":
            conn.begin(b"GET / HTTP/1.1\r\n\r\n", complete=True, head_request=False)
        else:
            conn.send_body([b"body"], last=True)


@pytest.mark.anyio
async def test_begin_on_a_closed_connection_is_unavailable() -> None:
    conn = _conn_new()
    conn.connection_lost(None)

    with pytest.raises(UpstreamUnavailable, match="closed the connection"):
        conn.begin(b"GET / HTTP/1.1\r\n\r\n", complete=True, head_request=False)


# --- Connection and pool: the exchange's slow task, and the pool's interface ---------------------


async def _conn_tick_until(condition: Any, limit: float = 2.0) -> None:
    """Let the loop (and the pool's ticker) run until ``condition()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not condition():
        assert loop.time() < deadline, "the condition never held"
        await asyncio.sleep(TICK / 5)


@pytest.mark.anyio
async def test_slow_exchange_gets_its_task_and_a_fast_one_never_does() -> None:
    started: list[Connection] = []

    async def task(conn: Connection, arg: str) -> None:
        started.append(conn)
        await asyncio.Event().wait()

    slow, _ = _conn_open()
    slow.when_slow(task, "x")
    fast, fast_transport = _conn_open()
    fast.when_slow(task, "x")
    _conn_feed(fast, fast_transport, _CONN_CL_RESPONSE, 0)
    await upstream_head(fast, 1)
    await _conn_read_all(fast)
    assert fast.end_exchange()

    await _conn_tick_until(lambda: started)
    await asyncio.sleep(3 * TICK)

    assert started == [slow]


@pytest.mark.anyio
@pytest.mark.parametrize("end", ["end_exchange", "abort"])
async def test_the_slow_task_is_cancelled_when_the_exchange_ends(end: str) -> None:
    ran = asyncio.Event()
    cancelled = asyncio.Event()

    async def task(conn: Connection, arg: None) -> None:
        ran.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    conn, _ = _conn_open()
    conn.when_slow(task, None)
    await asyncio.wait_for(ran.wait(), 2)

    getattr(conn, end)()

    await asyncio.wait_for(cancelled.wait(), 1)


@pytest.mark.anyio
async def test_pool_forgets_an_idle_connection_the_plugin_closed() -> None:
    pool = UpstreamPool()
    transport = _ConnTransport()
    conn = _conn_new(transport, pool)
    conn.begin(b"GET / HTTP/1.1\r\n\r\n", complete=True, head_request=False)
    _conn_feed(conn, transport, _CONN_CL_RESPONSE, 0)
    await _conn_read_all(conn)
    pool.release(conn)
    assert (pool.idle_count(), pool.busy_count()) == (1, 0)

    conn.connection_lost(None)

    assert pool.idle_count() == 0
    assert pool.take_idle(conn.upstream) is None


@pytest.mark.anyio
async def test_pool_closes_a_connection_released_unfinished() -> None:
    pool = UpstreamPool()
    transport = _ConnTransport()
    conn = _conn_new(transport, pool)
    conn.begin(b"GET / HTTP/1.1\r\n\r\n", complete=True, head_request=False)
    assert pool.busy_count() == 1

    pool.release(conn)

    assert transport.aborted
    assert (pool.idle_count(), pool.busy_count()) == (0, 0)


# --- the retry decision ------------------------------------------------------------------------

_UNAVAILABLE = UpstreamUnavailable("the plugin closed the connection before responding")


@pytest.mark.parametrize(
    ("error", "method", "reused", "received_any", "whole", "retry"),
    [
        pytest.param(_UNAVAILABLE, "GET", True, False, True, True, id="pooled-closed-get"),
        pytest.param(_UNAVAILABLE, "PUT", True, False, True, True, id="pooled-closed-put"),
        pytest.param(_UNAVAILABLE, "DELETE", True, False, True, True, id="pooled-closed-delete"),
        pytest.param(_UNAVAILABLE, "POST", True, False, True, False, id="post-is-not-idempotent"),
        pytest.param(_UNAVAILABLE, "PATCH", True, False, True, False, id="patch-is-not-idempotent"),
        pytest.param(_UNAVAILABLE, "GET", False, False, True, False, id="new-connection"),
        pytest.param(_UNAVAILABLE, "GET", True, True, True, False, id="bytes-received"),
        pytest.param(_UNAVAILABLE, "PUT", True, False, False, False, id="body-streamed"),
        pytest.param(ClientGone("gone"), "GET", True, False, True, False, id="client-gone"),
        pytest.param(UpstreamTimeout("slow"), "GET", True, False, True, False, id="timeout"),
        pytest.param(UpstreamProtocolError("bad"), "GET", True, True, True, False, id="protocol-error"),
    ],
)
def test_a_failed_exchange_is_sent_again_only_when_nothing_can_have_come_of_it(
    error: ProxyError, method: str, reused: bool, received_any: bool, whole: bool, retry: bool
) -> None:
    assert may_retry(error, method, reused=reused, received_any=received_any, whole=whole) is retry


def test_idempotent_methods_are_rfc_9110s() -> None:
    assert IDEMPOTENT_METHODS == {"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"}


# --- the client watch --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_client_watch_aborts_the_connection_when_the_client_leaves() -> None:
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    conn, transport = _conn_open()
    watch = asyncio.ensure_future(watch_client(conn, messages.get))

    await messages.put({"type": "http.request", "body": b"unread", "more_body": False})  # dropped
    await asyncio.sleep(0)
    assert not transport.aborted
    await messages.put({"type": "http.disconnect"})
    await asyncio.wait_for(watch, 1)

    assert transport.aborted
    with pytest.raises(ClientGone):
        await upstream_head(conn, 1)


@pytest.mark.anyio
async def test_client_watch_started_by_the_ticker_fails_a_slow_exchange_with_client_gone() -> None:
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await messages.put({"type": "http.disconnect"})
    conn, transport = _conn_open()
    conn.when_slow(watch_client, messages.get)

    with pytest.raises(ClientGone):
        await upstream_head(conn, 5)
    assert transport.aborted
    assert not conn.end_exchange()


@pytest.mark.anyio
@_conn_by_split
@pytest.mark.parametrize(("value", "found"), [(b"tok-" + b"s" * 40, True), (b"other", False)], ids=["echoed", "absent"])
async def test_the_requests_secret_is_noticed_in_the_response_head_however_it_arrives(
    value: bytes, found: bool, split: int
) -> None:
    transport = _ConnTransport()
    conn = _conn_new(transport)
    conn.begin(b"GET / HTTP/1.1\r\n\r\n", complete=True, head_request=False, secret=b"tok-" + b"s" * 40)

    _conn_feed(conn, transport, b"HTTP/1.1 200 OK\r\nX-Debug: %s\r\nContent-Length: 2\r\n\r\nok" % value, split)
    await upstream_head(conn, 1)

    assert conn.secret_in_head is found
