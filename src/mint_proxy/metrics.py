"""Prometheus metrics: counted in plain Python per request, rendered by ``prometheus_client`` on scrape.

    metrics = ProxyMetrics()
    platform.add_middleware(ProxyMiddleware, routes=routes, tokens=issuer, metrics=metrics)
    platform.mount("/_mint", AdminApp(routes, metrics=metrics))      # GET /_mint/metrics

Theory of operation
-------------------
A request costs a few dict and list updates here (``observe``), no lock and no
``prometheus_client`` call: a ``Counter.inc`` costs about a microsecond and a
``Histogram.observe`` several, more than the budget of the whole hook. The series
are turned into Prometheus metric families only when scraped (``render``), which is
the only place ``prometheus_client`` (the ``mint-proxy[metrics]`` extra) is needed.

Several workers (``uvicorn --workers N``, gunicorn): set ``PROMETHEUS_MULTIPROC_DIR``
(or pass ``multiprocess_dir``) to a directory that is empty when the server starts,
as prometheus_client's multiprocess mode asks. Each worker then writes a snapshot of
its own series to ``<dir>/mint_proxy_<pid>.json`` (atomically, at most once a second
while it has news, and whenever it is scraped), and a scrape adds up every worker's
snapshot: counters and histograms of every worker that ever wrote one (a worker
that died keeps its counts, as in prometheus_client), gauges of live workers only.
So a scrape may miss at most the last second of another worker's traffic.

Labels stay bounded: ``plugin`` is a configured slug, ``method`` one of ``METHODS``
or ``OTHER``, ``code`` a status; never the path, query or request id.
"""

import asyncio
import json
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .errors import MintProxyError, UpstreamProtocolError, UpstreamTimeout, UpstreamUnavailable
from .plugins.spec import PluginState, PluginStatus

if TYPE_CHECKING:
    from ._exchange import Exchange
    from ._upstream import UpstreamPool

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds. Analyses run long: the last finite bucket is one hour.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
TTFB_BUCKETS = DURATION_BUCKETS
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "WEBSOCKET")
_METHOD = {m: m for m in METHODS}
FLUSH_INTERVAL = 1.0

PluginStatusProvider = Callable[[], Mapping[str, PluginStatus]]


class MetricsUnavailable(MintProxyError):
    """Raised when metrics are rendered without ``prometheus_client`` installed."""


def upstream_error_reason(error: Exception | None) -> str | None:
    """``refused`` (no connection, or it dropped), ``timeout`` or ``protocol``; ``None`` for other errors."""
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    if isinstance(error, UpstreamProtocolError):
        return "protocol"
    if isinstance(error, UpstreamUnavailable):
        return "refused"
    return None


def _histogram(buckets: int) -> list[float]:
    return [0.0] * (buckets + 2)  # [sum, count per bucket..., count above the last bucket]


class ProxyMetrics:
    """The proxy's metrics for one process; ``render()`` gives the Prometheus text of all workers.

    ``plugin_status``: an optional callable returning ``{slug: PluginStatus}`` (the
    supervisor's view), exported as ``mint_plugin_*`` on every scrape.
    """

    def __init__(
        self,
        *,
        plugin_status: PluginStatusProvider | None = None,
        multiprocess_dir: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if multiprocess_dir is None:
            multiprocess_dir = (os.environ if environ is None else environ).get(MULTIPROC_ENV) or None
        self.multiprocess_dir = multiprocess_dir
        self.plugin_status = plugin_status
        self._requests: dict[tuple[str, str, int], int] = {}
        self._durations: dict[str, list[float]] = {}
        self._ttfbs: dict[str, list[float]] = {}
        self._errors: dict[tuple[str, str], int] = {}
        self._retries: dict[str, int] = {}
        # The proxy's hot path adds to these directly (an attribute add costs far less than a call);
        # requests in progress = started - finished.
        self.started = 0
        self.finished = 0
        self._ws_active: dict[str, int] = {}
        self._ws_total: dict[str, int] = {}
        self._reloads: dict[str, int] = {}
        self._last_reload = 0.0
        self._pools: list[UpstreamPool] = []
        self._flush: asyncio.TimerHandle | None = None

    # -- the hooks (hot path: plain dict and list updates) ---------------------------------------

    def observe(self, exchange: "Exchange") -> None:
        """Count one finished refusal or WebSocket session (proxied HTTP requests use ``observe_http``)."""
        scope = exchange.scope
        method = scope["method"] if scope["type"] == "http" else "WEBSOCKET"
        self.observe_http(exchange.plugin, method, exchange.status, exchange.duration, exchange.ttfb, exchange.error)

    def observe_http(
        self,
        plugin: str,
        method: str,
        status: int,
        duration: float,
        ttfb: float | None,
        error: Exception | None,
    ) -> None:
        """Count one finished exchange (positional arguments: this runs once per request)."""
        key = (plugin, _METHOD.get(method, "OTHER"), status)
        requests = self._requests
        requests[key] = requests.get(key, 0) + 1
        series = self._durations.get(plugin)
        if series is None:
            series = self._durations[plugin] = _histogram(len(DURATION_BUCKETS))
        series[0] += duration
        series[1 + bisect_left(DURATION_BUCKETS, duration)] += 1
        if ttfb is not None:
            series = self._ttfbs.get(plugin)
            if series is None:
                series = self._ttfbs[plugin] = _histogram(len(TTFB_BUCKETS))
            series[0] += ttfb
            series[1 + bisect_left(TTFB_BUCKETS, ttfb)] += 1
        if error is not None:
            reason = upstream_error_reason(error)
            if reason is not None:
                errors = self._errors
                errors[(plugin, reason)] = errors.get((plugin, reason), 0) + 1
        if self.multiprocess_dir is not None and self._flush is None:
            self._schedule_flush()

    def retried(self, plugin: str) -> None:
        """Count a request sent again on a new connection (a pooled one turned out closed)."""
        self._retries[plugin] = self._retries.get(plugin, 0) + 1

    def websocket_opened(self, plugin: str) -> None:
        self._ws_active[plugin] = self._ws_active.get(plugin, 0) + 1
        self._ws_total[plugin] = self._ws_total.get(plugin, 0) + 1

    def websocket_closed(self, plugin: str) -> None:
        self._ws_active[plugin] = self._ws_active.get(plugin, 1) - 1

    def config_reloaded(self, ok: bool) -> None:
        """Count a config reload (``ok``: applied; else the file was broken and the last good routes stay)."""
        result = "success" if ok else "failure"
        self._reloads[result] = self._reloads.get(result, 0) + 1
        if ok:
            self._last_reload = time.time()
        if self.multiprocess_dir is not None:
            self._write_snapshot()

    def add_pool(self, pool: "UpstreamPool") -> None:
        """Report ``pool``'s idle and in-use upstream connections (read when scraped or flushed)."""
        if pool not in self._pools:
            self._pools.append(pool)

    # -- snapshots and rendering ------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """This process's series as JSON-ready data (the multiprocess file's content)."""
        idle = sum(pool.idle_count() for pool in self._pools)
        busy = sum(pool.busy_count() for pool in self._pools)
        return {
            "pid": os.getpid(),
            "requests": [[*key, count] for key, count in self._requests.items()],
            "durations": self._durations,
            "ttfbs": self._ttfbs,
            "errors": [[*key, count] for key, count in self._errors.items()],
            "retries": self._retries,
            "active": self.started - self.finished,
            "ws_active": self._ws_active,
            "ws_total": self._ws_total,
            "reloads": self._reloads,
            "last_reload": self._last_reload,
            "pool": {"idle": idle, "active": busy},
        }

    def _schedule_flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_snapshot()
            return
        self._flush = loop.call_later(FLUSH_INTERVAL, self._write_snapshot)

    def _write_snapshot(self) -> None:
        self._flush = None
        directory = self.multiprocess_dir
        if directory is None:
            return
        path = os.path.join(directory, f"mint_proxy_{os.getpid()}.json")
        temp = f"{path}.tmp"
        with open(temp, "w", encoding="utf-8") as file:
            json.dump(self.snapshot(), file)
        os.replace(temp, path)

    def _snapshots(self) -> Iterator[tuple[dict[str, Any], bool]]:
        """Every worker's snapshot and whether that worker is alive (this one's fresh)."""
        directory = self.multiprocess_dir
        if directory is None:
            yield self.snapshot(), True
            return
        self._write_snapshot()
        for name in sorted(os.listdir(directory)):
            if not (name.startswith("mint_proxy_") and name.endswith(".json")):
                continue
            try:
                with open(os.path.join(directory, name), encoding="utf-8") as file:
                    data = json.load(file)
            except (OSError, ValueError):
                continue  # being replaced, or not ours
            yield data, _alive(int(data.get("pid", 0)))

    def render(self) -> bytes:
        """The Prometheus text exposition of every worker's metrics; ``MetricsUnavailable`` without the extra."""
        try:
            from prometheus_client import CollectorRegistry, generate_latest
        except ImportError:
            raise MetricsUnavailable("metrics need prometheus_client: pip install 'mint-proxy[metrics]'") from None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        return generate_latest(registry)

    def collect(self) -> Iterable[Any]:
        """The metric families (``prometheus_client.core``), for a platform's own registry."""
        return _Collector(self).collect()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Collector:
    """Builds the metric families from every snapshot (a prometheus_client custom collector)."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        requests: dict[tuple[str, str, str], float] = {}
        durations: dict[str, list[float]] = {}
        ttfbs: dict[str, list[float]] = {}
        errors: dict[tuple[str, str], float] = {}
        retries: dict[str, float] = {}
        active = 0.0
        ws_active: dict[str, float] = {}
        ws_total: dict[str, float] = {}
        reloads: dict[str, float] = {}
        last_reload = 0.0
        pool = {"idle": 0.0, "active": 0.0}
        for data, alive in self.metrics._snapshots():
            for plugin, method, code, count in data["requests"]:
                key = (plugin, method, str(code))
                requests[key] = requests.get(key, 0) + count
            _add_histograms(durations, data["durations"])
            _add_histograms(ttfbs, data["ttfbs"])
            for plugin, reason, count in data["errors"]:
                errors[(plugin, reason)] = errors.get((plugin, reason), 0) + count
            _add(retries, data["retries"])
            _add(ws_total, data["ws_total"])
            _add(reloads, data["reloads"])
            last_reload = max(last_reload, data["last_reload"])
            if alive:
                active += data["active"]
                _add(ws_active, data["ws_active"])
                _add(pool, data["pool"])

        family = CounterMetricFamily(
            "mint_proxy_requests",
            "Requests answered, by plugin, method and status code.",
            labels=["plugin", "method", "code"],
        )
        for key, count in sorted(requests.items()):
            family.add_metric(list(key), count)
        yield family
        yield _histogram_family(
            HistogramMetricFamily,
            "mint_proxy_request_duration_seconds",
            "Time from the request's arrival to its last response byte (WebSocket: the session).",
            durations,
            DURATION_BUCKETS,
        )
        yield _histogram_family(
            HistogramMetricFamily,
            "mint_proxy_upstream_time_to_first_byte_seconds",
            "Time from the request's arrival until the plugin's response head was in.",
            ttfbs,
            TTFB_BUCKETS,
        )
        family = CounterMetricFamily(
            "mint_proxy_upstream_errors",
            "Failed exchanges with a plugin: refused (no connection or it dropped), timeout, protocol.",
            labels=["plugin", "reason"],
        )
        for (plugin, reason), count in sorted(errors.items()):
            family.add_metric([plugin, reason], count)
        yield family
        yield _per_plugin(
            CounterMetricFamily,
            "mint_proxy_retries",
            "Requests sent again on a new connection after a pooled one turned out closed.",
            retries,
        )
        yield GaugeMetricFamily("mint_proxy_active_requests", "Proxied HTTP requests in progress.", value=active)
        gauge = GaugeMetricFamily(
            "mint_proxy_upstream_connections", "Pooled connections to plugins, by state.", labels=["state"]
        )
        for state in ("idle", "active"):
            gauge.add_metric([state], pool[state])
        yield gauge
        yield _per_plugin(
            GaugeMetricFamily, "mint_proxy_websocket_sessions_active", "WebSocket sessions open now.", ws_active
        )
        yield _per_plugin(
            CounterMetricFamily, "mint_proxy_websocket_sessions", "WebSocket sessions accepted.", ws_total
        )
        family = CounterMetricFamily("mint_proxy_config_reloads", "Config file reloads, by result.", labels=["result"])
        for result in ("success", "failure"):
            family.add_metric([result], reloads.get(result, 0))
        yield family
        yield GaugeMetricFamily(
            "mint_proxy_config_last_reload_success_timestamp_seconds",
            "When the config was last reloaded successfully (0: never since start).",
            value=last_reload,
        )
        provider = self.metrics.plugin_status
        if provider is not None:
            yield from _plugin_families(provider())


def _add(total: dict[str, float], part: Mapping[str, float]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0) + value


def _add_histograms(total: dict[str, list[float]], part: Mapping[str, list[float]]) -> None:
    for plugin, series in part.items():
        mine = total.get(plugin)
        if mine is None:
            total[plugin] = list(series)
        else:
            for i, value in enumerate(series):
                mine[i] += value


def _histogram_family(
    family_type: Any, name: str, documentation: str, series: Mapping[str, list[float]], bounds: tuple[float, ...]
) -> Any:
    family = family_type(name, documentation, labels=["plugin"])
    for plugin, values in sorted(series.items()):
        cumulative, buckets = 0.0, []
        for bound, count in zip([*(repr(b) for b in bounds), "+Inf"], values[1:], strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric([plugin], buckets, values[0])
    return family


def _per_plugin(family_type: Any, name: str, documentation: str, values: Mapping[str, float]) -> Any:
    family = family_type(name, documentation, labels=["plugin"])
    for plugin, value in sorted(values.items()):
        family.add_metric([plugin], value)
    return family


def _plugin_families(statuses: Mapping[str, PluginStatus]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    up = GaugeMetricFamily("mint_plugin_up", "1 when the supervised plugin is READY, else 0.", labels=["plugin"])
    restarts = CounterMetricFamily(
        "mint_plugin_restarts", "Times the supervisor restarted the plugin.", labels=["plugin"]
    )
    state = GaugeMetricFamily(
        "mint_plugin_state", "The plugin's supervisor state: 1 for the current one.", labels=["plugin", "state"]
    )
    start = GaugeMetricFamily(
        "mint_plugin_start_duration_seconds",
        "How long the plugin's last start took to become READY.",
        labels=["plugin"],
    )
    for slug, status in sorted(statuses.items()):
        up.add_metric([slug], 1.0 if status.state == PluginState.READY else 0.0)
        restarts.add_metric([slug], status.restarts)
        for each in PluginState:
            state.add_metric([slug, str(each)], 1.0 if status.state == each else 0.0)
        if status.start_seconds is not None:
            start.add_metric([slug], status.start_seconds)
    yield from (up, restarts, state, start)
