"""mint_plugin: the plugin side of MINT's isolation system.

This package is what runs *inside* a plugin's process or venv, so it imports
nothing but the standard library at import time; its submodules need at most
``uvicorn`` (the plugin host) and ``httpx`` (the platform client). It never
imports ``mint_proxy``: an isolated plugin's venv holds a copy of this package
and not the platform's dependencies.
"""

from ._context import RequestContext, current_request

__all__ = ["RequestContext", "current_request"]
