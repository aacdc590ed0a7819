"""Every worker's view of the supervisor: ``<runtime_dir>/state.json`` turned into one dict.

    watcher = StateWatcher(runtime_dir)
    proxy = ProxyMiddleware(app, routes=routes, unavailable=watcher.unavailable)
    ...  # call watcher.check() every interval (the dev app's loop does)

The supervisor (in whichever process holds the lock, or ``mint-proxy supervise``)
writes the state file atomically; each worker polls its signature like
``ConfigWatcher`` and, when it changed and parses, updates ``unavailable`` in
place: ``{slug: epoch when the plugin is expected back}`` for every plugin in
BACKOFF, FATAL or STOPPED (``inf`` when it will not come back by itself). The
proxy's only per-request cost is one probe of that dict; a plugin expected back
within the retry window is still forwarded, so the existing retry bridges a quick
restart and the client sees no error.
"""

import logging
import math
import os
import time

from ..errors import PluginUnavailable
from .spec import UNAVAILABLE_STATES, PluginState, PluginStatus

STATE_FILE = "state.json"
# Retry-After for a plugin that will not come back by itself (FATAL, STOPPED): someone must act.
DOWN_RETRY_AFTER = 30
_DETAIL = {
    PluginState.BACKOFF: "the plugin crashed and is waiting to restart",
    PluginState.FATAL: "the plugin crashed too often and stays down until restarted",
    PluginState.STOPPED: "the plugin is stopped",
}


def plugin_unavailable(slug: str, back: float, retry_window: float) -> PluginUnavailable | None:
    """The 503 for a plugin expected back at epoch ``back``; ``None`` if the retry window will bridge it."""
    wait = back - time.time()
    if wait <= retry_window:
        return None
    if math.isinf(wait):
        return PluginUnavailable(f"plugin {slug!r} is not running", retry_after=DOWN_RETRY_AFTER)
    return PluginUnavailable(f"plugin {slug!r} is restarting", retry_after=max(1, math.ceil(wait)))


def expected_back(status: PluginStatus) -> float | None:
    """Epoch when a plugin in an unavailable state should answer again (``inf``: not by itself); None if up."""
    if status.state not in UNAVAILABLE_STATES:
        return None
    if status.state is PluginState.BACKOFF and status.retry_after is not None:
        return status.since + status.retry_after + (status.start_seconds or 0.0)
    return math.inf


class StateWatcher:
    """Keeps ``unavailable`` in step with ``<runtime_dir>/state.json``; never raises from ``check``.

    ``unavailable`` is updated in place (the proxy holds the same dict), between two
    awaits, so a request sees either the old view or the new one. ``statuses`` is the
    last state read. No state file (no supervisor yet) means every plugin is up.
    """

    def __init__(self, runtime_dir: str, *, logger: logging.Logger | None = None) -> None:
        self.path = os.path.join(runtime_dir, STATE_FILE)
        self.unavailable: dict[str, float] = {}
        self.statuses: dict[str, PluginStatus] = {}
        self._logger = logger or logging.getLogger("mint_proxy.plugins")
        self._signature: tuple[int, int, int] | None = None
        self._reported = False

    def check(self) -> bool:
        """Poll once; return True when the view changed."""
        try:
            stat = os.stat(self.path)
        except OSError:
            signature = None
        else:
            signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if signature == self._signature:
            return False
        statuses = self._read() if signature is not None else {}
        if statuses is None:
            return False  # unreadable: keep the last view, look again next poll
        self._signature = signature
        self.statuses = statuses
        down = {slug: back for slug, status in statuses.items() if (back := expected_back(status)) is not None}
        if down == self.unavailable:
            return False
        for slug in [slug for slug in self.unavailable if slug not in down]:
            del self.unavailable[slug]
        self.unavailable.update(down)
        return True

    def _read(self) -> dict[str, PluginStatus] | None:
        from .runtime import StateFileError, read_status

        try:
            statuses = read_status(os.path.dirname(self.path))
        except StateFileError as exc:
            if not self._reported:
                self._logger.warning("%s; keeping the last plugin states", exc)
                self._reported = True
            return None
        self._reported = False
        return statuses
