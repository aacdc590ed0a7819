"""The plugin's client for the platform's ``/api/internal`` surface, identical in both modes.

    from mint_plugin.client import PlatformClient

    async def handler(...):
        async with PlatformClient() as platform:
            experiment = (await platform.get("experiments/42")).json()

Every call carries the internal token and the request id of the request being served
(``mint_plugin.current_request``, set by the plugin host or the in-process mount), so
the platform verifies it with ``InternalTokenAuth`` and its log lines join the plugin's.

Where the platform is, is never the plugin's choice:

- shared mode: mint_proxy's in-process mount calls ``serve_in_process(platform_app)``;
  calls go through ``httpx.ASGITransport`` straight into the platform app.
- isolated mode: the supervisor sets ``MINT_PLATFORM_URL`` (``http://host:port`` or
  ``unix:/path/to.sock``); calls go over HTTP.

Needs ``httpx``; imports nothing from mint_proxy.
"""

import os
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import httpx

from ._context import current_request

PLATFORM_URL_ENV = "MINT_PLATFORM_URL"
INTERNAL_PREFIX = "/api/internal/"
_IN_PROCESS_BASE = "http://mint-platform"

_in_process_app: Any = None


class PlatformUnavailable(RuntimeError):
    """Raised when the client cannot tell where the platform is, or is used outside a request."""


def serve_in_process(app: Any) -> None:
    """Make calls from this process go to ``app`` (an ASGI app) in-process.

    Called by mint_proxy's shared-mode mount when the platform starts; plugin code never calls it.
    """
    global _in_process_app
    _in_process_app = app


def _transport(environ: Mapping[str, str]) -> tuple[httpx.AsyncBaseTransport, str]:
    if _in_process_app is not None:
        return httpx.ASGITransport(app=_in_process_app, raise_app_exceptions=False), _IN_PROCESS_BASE
    url = environ.get(PLATFORM_URL_ENV, "")
    if url.startswith("unix:"):
        return httpx.AsyncHTTPTransport(uds=url.removeprefix("unix:")), "http://mint-platform"
    if url.startswith(("http://", "https://")):
        return httpx.AsyncHTTPTransport(), url.rstrip("/")
    raise PlatformUnavailable(
        f"no platform to call: {PLATFORM_URL_ENV} is not set (isolated mode) and no platform app is "
        "served in-process (shared mode); run the plugin under the mint plugin host or the platform"
    )


class PlatformClient:
    """An httpx client for ``/api/internal``; paths are relative to it (``"experiments/42"``).

    Use it while serving a request: it takes the token and request id from
    ``current_request``. ``timeout`` is httpx's (seconds).
    """

    def __init__(self, *, timeout: float = 30.0, environ: Mapping[str, str] | None = None) -> None:
        transport, base = _transport(os.environ if environ is None else environ)
        self._client = httpx.AsyncClient(transport=transport, base_url=base, timeout=timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """``method`` ``/api/internal/<path>`` with the current request's token and id."""
        context = current_request.get()
        if context is None:
            raise PlatformUnavailable("PlatformClient is used outside a request: there is no token to call with")
        headers = dict(kwargs.pop("headers", None) or {})
        headers["X-Request-Id"] = context.request_id
        if context.internal_token is not None:
            headers["X-Mint-Internal-Token"] = context.internal_token
        url = path if path.startswith(INTERNAL_PREFIX) else INTERNAL_PREFIX + path.lstrip("/")
        return await self._client.request(method, url, headers=headers, **kwargs)

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", path, **kwargs)

    async def put(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("PUT", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("DELETE", path, **kwargs)
