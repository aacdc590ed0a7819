"""The access log: one line per proxied request, as text or JSON, on the ``mint_proxy.access`` logger.

    enable_access_log()                 # text lines on stderr (mounted in a platform)
    enable_access_log(format="json")    # one JSON object per line

The proxy builds one ``Exchange`` when a request ends, only when someone is listening
(the access logger is enabled, or metrics are on), and hands it to the metrics and to
the logger as the record's only argument. Formatting happens in the handler's formatter,
so an exchange nobody prints is never rendered.

Every field that comes from the client (method, path, query, request id, client address)
is escaped the way nginx writes its log: a byte outside printable ASCII, and ``"`` and
``\\``, becomes ``\\xHH``. No request can end a line, start a fake one, or reach a terminal
as an escape sequence, in either format.

One event, one line, at one level: a response aborted after its head went out (the plugin
died, or timed out, mid-body) is logged once, at WARNING, with the status the client saw
and ``reason="aborted: ..."``; the proxy's own 502/504 answers are WARNING too; everything
else is INFO.
"""

import json
import logging
import multiprocessing
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from ._exchange import Exchange, escape_text
from ._types import Scope

if TYPE_CHECKING:
    from .errors import ProxyError
    from .headers import RequestInfo
    from .metrics import ProxyMetrics

ACCESS_LOGGER = "mint_proxy.access"
LOG_FORMATS = ("text", "json")
access_logger = logging.getLogger(ACCESS_LOGGER)
# ``access_logger.isEnabledFor``'s own answers by level: the dict ``logging`` fills on each first
# question and empties whenever any level changes (``setLevel``, ``logging.disable``). Looking a
# level up here is one C call, not a Python one, on a path that runs once per request: ``True``
# or a missing answer means ask ``isEnabledFor`` (which still says no for a disabled logger).
access_log_answers: dict[int, bool] = access_logger._cache  # type: ignore[attr-defined]


def _exchange_of(record: logging.LogRecord) -> Exchange | None:
    args = record.args
    if isinstance(args, tuple) and len(args) == 1 and isinstance(args[0], Exchange):
        return args[0]
    return None


class TextAccessFormatter(logging.Formatter):
    """``<time> <LEVEL> mint_proxy.access: <line>``, with ``pid=`` when several workers run."""

    def __init__(self, *, show_pid: bool | None = None) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.show_pid = several_workers() if show_pid is None else show_pid

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if self.show_pid and _exchange_of(record) is not None:
            line += f" pid={record.process}"
        return line


class JSONAccessFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``pid``, then ``Exchange.fields()``.

    A record that is not an access line (a warning on the same handler) becomes
    ``{"time", "level", "pid", "logger", "message"}``.
    """

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "pid": record.process,
        }
        exchange = _exchange_of(record)
        if exchange is not None:
            data.update(exchange.fields())
        else:
            data["logger"] = record.name
            data["message"] = escape_text(record.getMessage())
        return json.dumps(data, ensure_ascii=True, separators=(",", ":"))


def formatter_for(format: str) -> logging.Formatter:
    """The formatter for a log format name (``text`` or ``json``); ``ValueError`` otherwise."""
    if format == "text":
        return TextAccessFormatter()
    if format == "json":
        return JSONAccessFormatter()
    raise ValueError(f"log format {format!r} is not one of: {', '.join(LOG_FORMATS)}")


def enable_access_log(
    *, format: str = "text", level: int = logging.INFO, stream: TextIO | None = None
) -> logging.Handler:
    """Print the access log (``mint_proxy.access``) on ``stream`` (default stderr); return the handler.

        from mint_proxy import enable_access_log
        enable_access_log(format="json")   # in the platform's startup, before serving

    The logger stops propagating, so the lines are not printed twice by a root handler.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter_for(format))
    access_logger.addHandler(handler)
    access_logger.setLevel(level)
    access_logger.propagate = False
    return handler


def several_workers() -> bool:
    """Whether this process is one of several workers (uvicorn ``--workers N``, gunicorn)."""
    return multiprocessing.parent_process() is not None or "gunicorn" in sys.modules


# Why a request did not simply complete: (reason for the access line, the ProxyError, aborted mid-response).
Failure = tuple[str, "ProxyError | None", bool]
_COMPLETE: Failure = ("", None, False)


def finish_http(
    metrics: "ProxyMetrics | None",
    scope: Scope,
    plugin: str,
    request_id: bytes,
    status: int,
    started: float,
    bytes_in: int,
    bytes_out: int,
    ttfb: float | None,
    failure: Failure | None,
    info: "RequestInfo | None",
) -> None:
    """Count a proxied HTTP request that ``metrics.started`` counted, and log its line.

    Positional and flat on purpose: this runs once per request when metrics are on, and the
    ``Exchange`` is only built when a line is printed.
    """
    duration = time.monotonic() - started  # (``started``: the proxy's ``time.monotonic()``)
    reason, error, aborted = failure or _COMPLETE
    if metrics is not None:
        metrics.finished += 1
        metrics.observe_http(plugin, scope["method"], status, duration, ttfb, error)
    level = logging.WARNING if aborted or status == 502 or status == 504 else logging.INFO
    if access_log_answers.get(level, True) and access_logger.isEnabledFor(level):
        exchange = Exchange(scope, plugin, request_id, status, duration, bytes_in=bytes_in, bytes_out=bytes_out)
        exchange.ttfb, exchange.reason, exchange.error, exchange.aborted = ttfb, reason, error, aborted
        exchange.trace_id = info.trace_id if info is not None else None
        access_logger.log(level, "%s", exchange)


def finish_exchange(metrics: "ProxyMetrics | None", exchange: Exchange) -> None:
    """Count ``exchange`` (a refusal or a WebSocket session) in ``metrics`` and log its line."""
    if metrics is not None:
        metrics.observe(exchange)
    level = exchange.level
    if access_logger.isEnabledFor(level):
        access_logger.log(level, "%s", exchange)


def refusal(
    metrics: "ProxyMetrics | None",
    scope: Scope,
    plugin: str,
    request_id: bytes,
    error: "ProxyError",
    *,
    duration: float = 0.0,
    bytes_out: int = 0,
) -> None:
    """Count and log a request or WebSocket the proxy answered with ``error`` (never forwarded, or refused)."""
    exchange = Exchange(
        scope,
        plugin,
        request_id,
        error.status,
        duration,
        bytes_out=bytes_out,
        reason=f"{error.error}: {error.detail}",
        error=error,
    )
    finish_exchange(metrics, exchange)
