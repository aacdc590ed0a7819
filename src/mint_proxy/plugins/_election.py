"""One supervisor per runtime directory: an ``flock`` on ``<runtime_dir>/supervisor.lock``.

Every worker of ``uvicorn --workers N`` (and ``mint-proxy supervise``) runs the same
startup; the one that gets the lock supervises, the others only route. The kernel
drops the lock when its holder exits, however it exits (SIGKILL included), so a
worker that keeps trying (``try_acquire`` on each poll) takes over within a poll
of the supervisor's death; the new supervisor's sweep stops what the old one left.
The file holds the holder's pid, for messages only: the lock is the truth.
"""

import contextlib
import fcntl
import os

LOCK_FILE = "supervisor.lock"


class SupervisorLock:
    """A non-blocking exclusive lock on a runtime directory, held until ``release`` or exit."""

    def __init__(self, runtime_dir: str) -> None:
        self.path = os.path.join(runtime_dir, LOCK_FILE)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; True if this process holds it now."""
        if self._fd is not None:
            return True
        # O_CLOEXEC (Python's default): a plugin process must never inherit the lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the only descriptor releases the flock

    def holder(self) -> int | None:
        """The pid the current holder wrote, if any (for messages; may be stale)."""
        try:
            with open(self.path, "rb") as file:
                text = file.read().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None
