"""Per-round results, medians relative to direct, and the markdown report with the goals."""

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

MIB = 1024 * 1024

# The goals the proxy is judged against.
GOAL_RPS64_RATIO = 0.60
GOAL_CPU_US = 60.0
GOAL_ADDED_P50_VS_NGINX = 1.3
GOAL_GET_RATIO = 0.6
GOAL_POST_RATIO = 0.7
GOAL_RSS_MIB = 64.0
# Against asgi_floor, the cheapest ASGI forwarder under the same uvicorn, in the same round: what
# the proxy's own work costs, whatever the machine (a faster machine moves direct, not these).
GOAL_CPU64_VS_FLOOR = 1.3
GOAL_ADDED_P50_VS_FLOOR = 1.15
GOAL_RPS64_VS_FLOOR = 0.85
# The floor sending upstream the fields mint_proxy adds (loadtests/floor.py, MINT_FLOOR_FIELDS=1):
# a reference, shown against the floor with no verdict, as the ceiling those bytes set.
FLOOR_FIELDS = "asgi_floor_fields"
REFERENCES = ("direct", "asgi_floor", FLOOR_FIELDS)  # no goals of their own


@dataclass(slots=True)
class RoundResult:
    """Everything measured for one target in one round (``None`` = not measured or failed)."""

    target: str
    round: int
    p50_us: float | None = None
    p99_us: float | None = None
    rps16: float | None = None
    rps64: float | None = None
    proxy_cpu_us: float | None = None
    proxy_cpu1_us: float | None = None  # at 1 connection: why the latency is what it is
    backend_cpu_us: float | None = None
    get_mbps: float | None = None
    post_mbps: float | None = None
    get_rss_mib: float | None = None
    post_rss_mib: float | None = None
    other_load_pct: float | None = None  # CPU time others used on the proxy's CPU, % of wall time
    # CPU time others (neither wrk nor the backend) used on wrk's and the backend's CPU during the
    # 64-connection run, % of its wall time: load there starves the proxy of requests and responses.
    client_other_load_pct: float | None = None
    errors: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Summary:
    """Medians over rounds for one target; differences and ratios are against direct in the same round."""

    target: str
    rounds: int
    values: dict[str, float | None]


Getter = Callable[[RoundResult], float | None]
DIRECT_METRICS: dict[str, Getter] = {
    "p50_us": lambda r: r.p50_us,
    "p99_us": lambda r: r.p99_us,
    "rps16": lambda r: r.rps16,
    "rps64": lambda r: r.rps64,
    "proxy_cpu_us": lambda r: r.proxy_cpu_us,
    "proxy_cpu1_us": lambda r: r.proxy_cpu1_us,
    "backend_cpu_us": lambda r: r.backend_cpu_us,
    "get_mbps": lambda r: r.get_mbps,
    "post_mbps": lambda r: r.post_mbps,
    "get_rss_mib": lambda r: r.get_rss_mib,
    "post_rss_mib": lambda r: r.post_rss_mib,
}


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


RELATIVE_METRICS: dict[str, Callable[[RoundResult, RoundResult], float | None]] = {
    "added_p50_us": lambda r, d: _diff(r.p50_us, d.p50_us),
    "added_p99_us": lambda r, d: _diff(r.p99_us, d.p99_us),
    "rps16_ratio": lambda r, d: _ratio(r.rps16, d.rps16),
    "rps64_ratio": lambda r, d: _ratio(r.rps64, d.rps64),
    "get_ratio": lambda r, d: _ratio(r.get_mbps, d.get_mbps),
    "post_ratio": lambda r, d: _ratio(r.post_mbps, d.post_mbps),
}


# Per round, the target's value against asgi_floor's in the same round (then the median).
FLOOR_METRICS: dict[str, Callable[[RoundResult, RoundResult, RoundResult | None], float | None]] = {
    "cpu64_vs_floor": lambda r, f, d: _ratio(r.proxy_cpu_us, f.proxy_cpu_us),
    "rps64_vs_floor": lambda r, f, d: _ratio(r.rps64, f.rps64),
    "added_p50_vs_floor": lambda r, f, d: (
        _ratio(_diff(r.p50_us, d.p50_us), _diff(f.p50_us, d.p50_us)) if d is not None else None
    ),
}


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(results: Sequence[RoundResult], targets: Sequence[str]) -> list[Summary]:
    """Median of each metric over the rounds, per target, in ``targets`` order."""
    direct = {r.round: r for r in results if r.target == "direct"}
    floor = {r.round: r for r in results if r.target == "asgi_floor"}
    summaries = []
    for name in targets:
        rows = [r for r in results if r.target == name]
        if not rows:
            continue
        values: dict[str, float | None] = {k: _median([get(r) for r in rows]) for k, get in DIRECT_METRICS.items()}
        for key, rel in RELATIVE_METRICS.items():
            values[key] = _median([rel(r, direct[r.round]) for r in rows if r.round in direct])
        for key, against in FLOOR_METRICS.items():
            values[key] = _median([against(r, floor[r.round], direct.get(r.round)) for r in rows if r.round in floor])
        summaries.append(Summary(name, len(rows), values))
    for reference in ("nginx", "asgi_floor"):
        found = next((s for s in summaries if s.target == reference), None)
        added = found.values["added_p50_us"] if found else None
        for summary in summaries:
            summary.values[f"added_p50_vs_{reference}"] = (
                _ratio(summary.values["added_p50_us"], added) if added and added > 0 else None
            )
    return summaries


def _fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}{suffix}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _goal_rows(summary: Summary) -> list[list[str]]:
    v = summary.values
    checks: list[tuple[str, float | None, str, bool | None, int]] = []

    def check(label: str, value: float | None, goal: str, ok: Callable[[float], bool], digits: int = 3) -> None:
        checks.append((label, value, goal, ok(value) if value is not None else None, digits))

    check(
        "throughput @64 conns × direct", v["rps64_ratio"], f"≥ {GOAL_RPS64_RATIO:.2f}", lambda x: x >= GOAL_RPS64_RATIO
    )
    check("proxy CPU µs/request @64", v["proxy_cpu_us"], f"≤ {GOAL_CPU_US:.0f}", lambda x: x <= GOAL_CPU_US, 1)
    if summary.target != "nginx":
        check(
            "added p50 @1 conn ÷ nginx's added p50",
            v["added_p50_vs_nginx"],
            f"≤ {GOAL_ADDED_P50_VS_NGINX}",
            lambda x: x <= GOAL_ADDED_P50_VS_NGINX,
        )
    check("streamed GET MB/s × direct", v["get_ratio"], f"≥ {GOAL_GET_RATIO}", lambda x: x >= GOAL_GET_RATIO)
    check("streamed POST MB/s × direct", v["post_ratio"], f"≥ {GOAL_POST_RATIO}", lambda x: x >= GOAL_POST_RATIO)
    check("GET RSS growth MiB", v["get_rss_mib"], f"< {GOAL_RSS_MIB:.0f}", lambda x: x < GOAL_RSS_MIB, 1)
    check("POST RSS growth MiB", v["post_rss_mib"], f"< {GOAL_RSS_MIB:.0f}", lambda x: x < GOAL_RSS_MIB, 1)
    verdict = {True: "yes", False: "**NO**", None: "not measured"}
    return [[summary.target, label, _fmt(value, d), goal, verdict[ok]] for label, value, goal, ok, d in checks]


def _floor_verdict(summary: Summary) -> str:
    """ "yes" when every ratio to the floor meets its goal, "**NO**" when one does not, "—" if one is missing.

    ``asgi_floor_fields`` is a reference: "reference", never a verdict.
    """
    if summary.target == FLOOR_FIELDS:
        return "reference"
    v = summary.values
    cpu, added, rps = v["cpu64_vs_floor"], v["added_p50_vs_floor"], v["rps64_vs_floor"]
    if cpu is None or added is None or rps is None:
        return "—"
    met = cpu <= GOAL_CPU64_VS_FLOOR and added <= GOAL_ADDED_P50_VS_FLOOR and rps >= GOAL_RPS64_VS_FLOOR
    return "yes" if met else "**NO**"


def render(
    summaries: Sequence[Summary],
    results: Sequence[RoundResult],
    *,
    meta: Sequence[str],
    skipped: dict[str, str],
) -> str:
    """The whole report as markdown."""
    out = ["# mint_proxy benchmark", "", *(f"- {line}" for line in meta), ""]
    floor_rows = [
        s
        for s in summaries
        if (s.target == FLOOR_FIELDS or s.target.startswith("mint_proxy")) and s.values["cpu64_vs_floor"]
    ]
    if floor_rows:
        out += ["## Against the floor (`asgi_floor`, same round; the goals)", ""]
        out += _table(
            [
                "target",
                f"CPU µs/req @64 ÷ floor's (goal ≤ {GOAL_CPU64_VS_FLOOR})",
                f"added p50 @1 ÷ floor's (goal ≤ {GOAL_ADDED_P50_VS_FLOOR})",
                f"req/s @64 ÷ floor's (goal ≥ {GOAL_RPS64_VS_FLOOR})",
                "all met",
            ],
            [
                [
                    s.target,
                    _fmt(s.values["cpu64_vs_floor"], 2),
                    _fmt(s.values["added_p50_vs_floor"], 2),
                    _fmt(s.values["rps64_vs_floor"], 2),
                    _floor_verdict(s),
                ]
                for s in floor_rows
            ],
        )
        if any(s.target == FLOOR_FIELDS for s in floor_rows):
            out += [
                "",
                f"`{FLOOR_FIELDS}` is the floor sending upstream the fields the spec makes a proxy add "
                "(X-Forwarded-*, Via, X-Request-Id, the internal token: ~520 bytes for wrk's GET instead of ~50) "
                "and no proxy code at all: the ceiling those bytes set in this layout, where the backend that "
                "parses them shares CPU 0 with wrk. mint_proxy's own share of the gap is its distance from that row.",
            ]
        out.append("")
    out += ["## Latency at 1 connection (small GET, `wrk -t1 -c1`)", ""]
    out += _table(
        [
            "target",
            "p50 µs",
            "p99 µs",
            "added p50 µs",
            "added p99 µs",
            "added p50 ÷ nginx's (goal ≤ 1.3)",
            "added p50 ÷ asgi_floor's",
            "proxy CPU µs/req @1",
        ],
        [
            [
                s.target,
                _fmt(s.values["p50_us"]),
                _fmt(s.values["p99_us"]),
                _fmt(s.values["added_p50_us"]) if s.target != "direct" else "—",
                _fmt(s.values["added_p99_us"]) if s.target != "direct" else "—",
                _fmt(s.values["added_p50_vs_nginx"], 2) if s.target not in ("direct", "nginx") else "—",
                _fmt(s.values["added_p50_vs_asgi_floor"], 2)
                if s.target not in ("direct", "nginx", "asgi_floor")
                else "—",
                _fmt(s.values["proxy_cpu1_us"], 1),
            ]
            for s in summaries
        ],
    )
    out += ["", "## Throughput and CPU (small GET, `wrk -t1 -c16` / `-c64`)", ""]
    out += _table(
        [
            "target",
            "req/s @16",
            "× direct @16",
            "req/s @64",
            "× direct @64 (goal ≥ 0.60)",
            "proxy CPU µs/req @64 (goal ≤ 60)",
            "backend CPU µs/req @64",
        ],
        [
            [
                s.target,
                _fmt(s.values["rps16"]),
                _fmt(s.values["rps16_ratio"], 2),
                _fmt(s.values["rps64"]),
                _fmt(s.values["rps64_ratio"], 2),
                _fmt(s.values["proxy_cpu_us"], 1),
                _fmt(s.values["backend_cpu_us"], 1),
            ]
            for s in summaries
        ],
    )
    out += ["", "## Streamed transfers (one connection, raw-socket client)", ""]
    out += _table(
        [
            "target",
            "GET MB/s",
            "GET × direct (goal ≥ 0.6)",
            "GET proxy RSS growth MiB (goal < 64)",
            "POST MB/s",
            "POST × direct (goal ≥ 0.7)",
            "POST proxy RSS growth MiB (goal < 64)",
        ],
        [
            [
                s.target,
                _fmt(s.values["get_mbps"]),
                _fmt(s.values["get_ratio"], 2),
                _fmt(s.values["get_rss_mib"], 1),
                _fmt(s.values["post_mbps"]),
                _fmt(s.values["post_ratio"], 2),
                _fmt(s.values["post_rss_mib"], 1),
            ]
            for s in summaries
        ],
    )
    goal_rows = [row for s in summaries if s.target not in REFERENCES for row in _goal_rows(s)]
    if goal_rows:
        out += ["", "## Goals", ""]
        out += _table(["target", "metric (median)", "measured", "goal", "met"], goal_rows)
    if skipped:
        out += ["", "## Skipped targets", ""]
        for name, reason in skipped.items():
            first, _, rest = reason.partition("\n")
            out.append(f"- **{name}**: {first}")
            if rest.strip():
                out += ["", "  ```", *(f"  {line}" for line in rest.strip().splitlines()), "  ```"]
    errors = [f"- round {r.round + 1}, {r.target}: {e}" for r in results for e in r.errors]
    if errors:
        out += ["", "## Errors", "", *errors]
    out += ["", "## Raw rounds", ""]
    out += _table(
        [
            "round",
            "target",
            "p50",
            "p99",
            "req/s @16",
            "req/s @64",
            "proxy µs/req",
            "GET MB/s",
            "POST MB/s",
            "proxy busy @64",
            "others' load on proxy CPU",
            "others' load on wrk+backend CPU @64",
        ],
        [
            [
                str(r.round + 1),
                r.target,
                _fmt(r.p50_us),
                _fmt(r.p99_us),
                _fmt(r.rps16),
                _fmt(r.rps64),
                _fmt(r.proxy_cpu_us, 1),
                _fmt(r.get_mbps),
                _fmt(r.post_mbps),
                _fmt(_busy(r), 0, "%"),
                _fmt(r.other_load_pct, 1, "%"),
                _fmt(r.client_other_load_pct, 1, "%"),
            ]
            for r in results
        ],
    )
    return "\n".join(out) + "\n"


def _busy(result: RoundResult) -> float | None:
    """The share of the 64-connection run the proxy's CPU spent on the proxy, in %."""
    if result.proxy_cpu_us is None or result.rps64 is None:
        return None
    return result.proxy_cpu_us * result.rps64 / 1e4
