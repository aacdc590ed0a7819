"""The internal-token secret every worker on a host shares when ``MINT_INTERNAL_TOKEN_SECRET`` is unset.

Each of ``uvicorn --workers N`` used to make its own random secret, so a token minted in
one worker failed verification in another. Now the first process to need it writes a
random secret to ``<runtime_dir>/internal-token.secret`` (mode 0600) and every other
process reads the same file. Creation is race-free: the secret is written to a private
temporary file first and ``os.link``-ed into place, which fails if the name exists, so
a reader never sees a half-written file and exactly one secret wins.
"""

import contextlib
import os
import secrets
import stat

from ..errors import MintProxyError

SECRET_FILE = "internal-token.secret"


class SecretFileError(MintProxyError):
    """Raised when the shared secret file is unsafe (not ours, readable by others) or unreadable."""


def shared_secret(runtime_dir: str) -> str:
    """The secret in ``<runtime_dir>/internal-token.secret``, creating it on first use."""
    path = os.path.join(runtime_dir, SECRET_FILE)
    if not os.path.exists(path):
        temp = os.path.join(runtime_dir, f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as file:
                file.write(secrets.token_urlsafe(48) + "\n")
                file.flush()
                os.fsync(file.fileno())
            with contextlib.suppress(FileExistsError):  # another process won: read its secret
                os.link(temp, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temp)
    return _read(path)


def _read(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SecretFileError(f"{path}: cannot read the shared secret ({exc.strerror})") from None
    with os.fdopen(fd, encoding="ascii") as file:
        info = os.fstat(file.fileno())
        if info.st_uid != os.getuid() or info.st_mode & 0o077 or not stat.S_ISREG(info.st_mode):
            raise SecretFileError(
                f"{path}: refusing a secret file that is not a private (0600) file of this user; "
                "delete it or set MINT_INTERNAL_TOKEN_SECRET"
            )
        secret = file.read().strip()
    if len(secret) < 32:
        raise SecretFileError(f"{path}: the shared secret is too short; delete the file to generate a new one")
    return secret
