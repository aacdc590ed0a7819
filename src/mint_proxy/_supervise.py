"""``mint-proxy supervise CONFIG``: the plugins of a config file, supervised by a process of their own.

For a systemd unit or a sidecar container beside the platform's workers (which then
run with ``MINT_PROXY_SUPERVISE=off`` and only route to the same sockets). It is the
dev app's own startup and shutdown without the HTTP server: the same lock, config
watcher (an edited plugin entry restarts that plugin) and state. If another process
holds the runtime dir's lock, it waits and takes over when that process exits.
SIGTERM or SIGINT stops the plugins and exits 0.
"""

import asyncio
import logging
import signal
import sys
from collections.abc import Mapping

from ._app import DevProxyApp
from .errors import MintProxyError

logger = logging.getLogger("mint_proxy")


def run_supervisor(environ: Mapping[str, str]) -> int:
    """Run until SIGTERM/SIGINT; return the exit status (1 if startup failed)."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return asyncio.run(_run(DevProxyApp(environ={**environ, "MINT_PROXY_SUPERVISE": "auto"})))


async def _run(app: DevProxyApp) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
    except MintProxyError as exc:
        print(f"mint-proxy supervise: error: {exc}", file=sys.stderr)
        return 1
    assert app.lock is not None and app.config is not None
    if not app.lock.held:
        holder = app.lock.holder()
        logger.warning(
            "%s is supervised by pid %s; waiting to take over when it exits",
            app.config.runtime_dir,
            holder if holder is not None else "?",
        )
    else:
        logger.info("supervising %d plugin(s); ready", len(app.config.plugins))
    try:
        await stop.wait()
    finally:
        await app.close()
    return 0
