"""Raw-socket HTTP/1.1 clients for the streamed transfers and readiness probes.

The client must never be the bottleneck: the download reads with ``recv_into`` into one
reused 1 MiB buffer and throws the bytes away; the upload sends the same 1 MiB buffer
again and again with a content-length, so nothing close to the transfer size is ever held
in memory. Each transfer has a hard deadline.
"""

import socket
import time
from dataclasses import dataclass

BUFFER_SIZE = 1024 * 1024
HEADER_LIMIT = 64 * 1024
MIN_TRANSFER_MBPS = 10.0  # slower than this and the transfer is abandoned as a failure


class TransferError(Exception):
    """A transfer failed: bad status, short body, wrong count, or its deadline passed."""


@dataclass(frozen=True, slots=True)
class TransferResult:
    nbytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


def transfer_deadline(nbytes: int) -> float:
    """Seconds allowed for one transfer of ``nbytes``: at least 20 s, else at 10 MB/s."""
    return max(20.0, nbytes / (MIN_TRANSFER_MBPS * 1e6))


def _connect(port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _Reader:
    """Read an HTTP/1.1 response from a socket into one reused buffer."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buffer = bytearray(BUFFER_SIZE)
        self.view = memoryview(self.buffer)
        self.pending = b""  # bytes already read but not yet consumed (after the header block)

    def _recv(self) -> int:
        if time.monotonic() > self.deadline:
            raise TransferError("deadline passed while receiving")
        return self.sock.recv_into(self.view, BUFFER_SIZE)

    def head(self) -> tuple[int, dict[str, str]]:
        """Read the status line and headers; return the status and lowercase header map."""
        data = b""
        while b"\r\n\r\n" not in data:
            if len(data) > HEADER_LIMIT:
                raise TransferError("response header block too large")
            n = self._recv()
            if n == 0:
                raise TransferError(f"connection closed before the response head ({len(data)} bytes read)")
            data += self.view[:n]
        head, _, self.pending = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise TransferError(f"bad status line {lines[0]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    def discard(self, nbytes: int) -> int:
        """Read and drop exactly ``nbytes`` body bytes (fewer if the peer closes); return the count."""
        got = min(len(self.pending), nbytes)
        self.pending = self.pending[got:]
        while got < nbytes:
            n = self._recv()
            if n == 0:
                break
            take = min(n, nbytes - got)
            if take < n:
                self.pending = bytes(self.view[take:n])
            got += take
        return got

    def line(self) -> bytes:
        """Read one CRLF-terminated line (for chunked framing)."""
        while b"\r\n" not in self.pending:
            if len(self.pending) > HEADER_LIMIT:
                raise TransferError("chunk-size line too long")
            n = self._recv()
            if n == 0:
                raise TransferError("connection closed inside chunked framing")
            self.pending += self.view[:n]
        line, _, self.pending = self.pending.partition(b"\r\n")
        return line

    def body(self, headers: dict[str, str]) -> int:
        """Consume the whole body per its framing; return the number of body bytes."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            total = 0
            while True:
                size = int(self.line().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.line():  # trailers end with an empty line
                        pass
                    return total
                if self.discard(size) != size:
                    raise TransferError("connection closed inside a chunk")
                total += size
                if self.line():
                    raise TransferError("missing CRLF after a chunk")
        if "content-length" in headers:
            return self.discard(int(headers["content-length"]))
        return self.discard(1 << 62)  # read until close

    def small_body(self, headers: dict[str, str]) -> bytes:
        """Read a small body and return it (for probes and upload answers)."""
        if "content-length" in headers:
            size = int(headers["content-length"])
            while len(self.pending) < size:
                n = self._recv()
                if n == 0:
                    break
                self.pending += self.view[:n]
            return self.pending[:size]
        chunks = b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while size := int(self.line().split(b";", 1)[0].strip() or b"0", 16):
                while len(self.pending) < size + 2:
                    n = self._recv()
                    if n == 0:
                        raise TransferError("connection closed inside a chunk")
                    self.pending += self.view[:n]
                chunks += self.pending[:size]
                self.pending = self.pending[size + 2 :]
            return chunks
        while n := self._recv():
            self.pending += self.view[:n]
        return self.pending


def get_small(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """One ``GET path`` with ``Connection: close``; return status and body."""
    with _connect(port, timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        reader = _Reader(sock, time.monotonic() + timeout)
        status, headers = reader.head()
        return status, reader.small_body(headers)


def download(port: int, path: str, nbytes: int) -> TransferResult:
    """``GET path?bytes=N`` and discard the body as it arrives; check that exactly N bytes came."""
    deadline = transfer_deadline(nbytes)
    with _connect(port, timeout=deadline) as sock:
        request = f"GET {path}?bytes={nbytes} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        start = time.perf_counter()
        sock.sendall(request.encode())
        reader = _Reader(sock, time.monotonic() + deadline)
        status, headers = reader.head()
        if status != 200:
            raise TransferError(f"download answered {status}: {reader.small_body(headers)[:200]!r}")
        got = reader.body(headers)
        seconds = time.perf_counter() - start
    if got != nbytes:
        raise TransferError(f"download got {got} bytes, expected {nbytes}")
    return TransferResult(nbytes, seconds)


def upload(port: int, path: str, nbytes: int) -> TransferResult:
    """``POST path`` with an N-byte body sent from one reused 1 MiB buffer; check the echoed count."""
    deadline = transfer_deadline(nbytes)
    chunk = memoryview(b"u" * BUFFER_SIZE)
    with _connect(port, timeout=deadline) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {nbytes}\r\nConnection: close\r\n\r\n"
        )
        end = time.monotonic() + deadline
        start = time.perf_counter()
        sock.sendall(head.encode())
        remaining = nbytes
        try:
            while remaining:
                if time.monotonic() > end:
                    raise TransferError("deadline passed while sending")
                size = min(remaining, BUFFER_SIZE)
                sock.sendall(chunk[:size])
                remaining -= size
        except OSError as exc:
            raise TransferError(f"upload send failed after {nbytes - remaining} bytes: {exc}") from exc
        reader = _Reader(sock, end)
        status, headers = reader.head()
        answer = reader.small_body(headers)
        seconds = time.perf_counter() - start
    if status != 200 or answer.strip() != str(nbytes).encode():
        raise TransferError(f"upload answered {status} {answer[:200]!r}, expected 200 {nbytes}")
    return TransferResult(nbytes, seconds)
