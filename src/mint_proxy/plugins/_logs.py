"""Plugin output: drained concurrently, split into bounded lines, logged under the slug, tail kept.

Both pipes are read by their own task as fast as the plugin writes, so a plugin
never blocks on a full pipe. A line longer than ``MAX_LINE`` bytes (a 10 MB
progress bar without a newline) is emitted in ``MAX_LINE`` pieces: memory stays
bounded and nothing is dropped.
"""

import asyncio
import collections
import logging

MAX_LINE = 16 * 1024
_READ_SIZE = 64 * 1024


class LogSink:
    """Where one plugin's lines go: the logger ``mint_proxy.plugins.<slug>`` and a tail of N lines."""

    def __init__(self, slug: str, tail_lines: int) -> None:
        self.slug = slug
        self.logger = logging.getLogger(f"mint_proxy.plugins.{slug}")
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)

    def emit(self, raw: bytes, *, stream: str, pid: int) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self.tail.append(line)
        self.logger.info("%s | %s", self.slug, line, extra={"plugin": self.slug, "pid": pid, "stream": stream})


async def drain(reader: asyncio.StreamReader, sink: LogSink, *, stream: str, pid: int) -> None:
    """Read ``reader`` to EOF, emitting every complete line and every ``MAX_LINE`` piece."""
    pending = bytearray()
    while True:
        chunk = await reader.read(_READ_SIZE)
        if not chunk:
            break
        pending += chunk
        start = 0
        while True:
            newline = pending.find(b"\n", start, start + MAX_LINE + 1)
            if newline >= 0:
                sink.emit(bytes(pending[start:newline]), stream=stream, pid=pid)
                start = newline + 1
            elif len(pending) - start >= MAX_LINE:
                sink.emit(bytes(pending[start : start + MAX_LINE]), stream=stream, pid=pid)
                start += MAX_LINE
            else:
                break
        del pending[:start]
    if pending:
        sink.emit(bytes(pending), stream=stream, pid=pid)
