"""A stand-in for the plugin host, run by the tests inside an isolated venv.

    <venv>/bin/python tests/_mini_host.py module:app /path/to.sock

Sets ``mint_plugin.current_request`` from each request's headers (as the real host
does) and serves the app with uvicorn on a Unix socket. Only mint_plugin and uvicorn
are imported: the venv has neither mint_proxy nor the test runner's packages.
"""

import importlib
import sys
from typing import Any

import uvicorn

from mint_plugin import RequestContext, current_request


def _wrap(app: Any) -> Any:
    async def with_context(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await app(scope, receive, send)
            return
        reset = current_request.set(RequestContext.from_headers(scope["headers"]))
        try:
            await app(scope, receive, send)
        finally:
            current_request.reset(reset)

    return with_context


def main() -> None:
    target, socket_path = sys.argv[1], sys.argv[2]
    module, _, attr = target.partition(":")
    app = getattr(importlib.import_module(module), attr)
    uvicorn.run(_wrap(app), uds=socket_path, log_level="warning", lifespan="off")


if __name__ == "__main__":
    main()
