"""The names of the headers the proxy owns, as users write them (``mint_proxy.REQUEST_ID_HEADER``).

The one definition of each: ``headers`` derives the lowercase bytes form ASGI servers use from
these, and ``tokens`` reads the token with them.
"""

REQUEST_ID_HEADER = "X-Request-Id"
INTERNAL_TOKEN_HEADER = "X-Mint-Internal-Token"
