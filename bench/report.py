"""Turn raw figures into the table: values per server, ratios, targets, PASS/FAIL."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .run import CONCURRENCY, SMALL, Results

#: A check on the proxy's value, given every server's value for that row.
Check = Callable[[dict[str, float]], bool | None]


@dataclass
class Row:
    figure: str
    unit: str
    values: dict[str, float] = field(default_factory=dict)
    #: Differences from direct: ratios of them mean nothing.
    added: bool = False
    target: str = ""
    check: Check | None = None

    def verdict(self, server: str = "proxy") -> str:
        if self.check is None:
            return ""
        values = {**self.values, "proxy": self.values.get(server, math.nan)}
        outcome = self.check(values)
        return "n/a" if outcome is None else ("PASS" if outcome else "FAIL")


def _at_most(limit: float) -> Check:
    return lambda v: None if math.isnan(v.get("proxy", math.nan)) else v["proxy"] <= limit


def _below(limit: float) -> Check:
    return lambda v: None if math.isnan(v.get("proxy", math.nan)) else v["proxy"] < limit


def _vs_nginx(check: Callable[[float, float], bool]) -> Check:
    def run(v: dict[str, float]) -> bool | None:
        if math.isnan(v.get("proxy", math.nan)) or math.isnan(v.get("nginx", math.nan)):
            return None
        return check(v["proxy"], v["nginx"])

    return run


def rows(results: Results) -> list[Row]:
    figures = results.figures

    def raw(key: str) -> dict[str, float]:
        return dict(figures.get(key, {}))

    def added(key: str) -> dict[str, float]:
        values = raw(key)
        base = values.pop("direct", math.nan)
        return {name: value - base for name, value in values.items()}

    out: list[Row] = []
    for label in SMALL:
        for concurrency in CONCURRENCY:
            key = f"{label} c={concurrency}"
            for q in ("p50", "p99"):
                out.append(Row(f"{key} latency {q}", "ms", raw(f"{key} {q}")))
            for q in ("p50", "p99"):
                row = Row(f"{key} added latency {q}", "ms", added(f"{key} {q}"), added=True)
                if concurrency == 1 and q == "p50":
                    row.target, row.check = "<= 0.25 ms", _at_most(0.25)
                out.append(row)
            out.append(Row(f"{key} server CPU per request", "us", raw(f"{key} cpu/request")))
        out.append(
            Row(
                f"{label} c=32 requests/s", "1/s", raw(f"{label} c=32 rps"),
                target=">= 0.75x nginx", check=_vs_nginx(lambda p, n: p >= 0.75 * n),
            )
        )  # fmt: skip
    out.append(Row("streamed chunks/s (100 streams)", "1/s", raw("stream chunks/s")))
    out.append(
        Row(
            "CPU per 1,000 streamed chunks", "s", raw("stream cpu/1k chunks"),
            target="<= 1.3x nginx", check=_vs_nginx(lambda p, n: p <= 1.3 * n),
        )
    )  # fmt: skip
    out.append(
        Row("RSS per waiting client", "KiB", raw("rss/waiter KiB"), target="<= 10 KiB", check=_at_most(10))
    )
    for q in ("p50", "p99", "max"):
        row = Row(f"heartbeat lateness {q}", "ms", raw(f"heartbeat lateness {q}"))
        if q == "p99":
            row.target, row.check = "< 50 ms", _below(50)
        out.append(row)
    for q in ("p50", "p99"):
        row = Row(f"disconnect to upstream close {q}", "ms", raw(f"disconnect {q}"))
        if q == "p99":
            row.target, row.check = "< 20 ms", _below(20)
        out.append(row)
    return out


def _fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}" if magnitude < 1 else f"{value:.2f}"


def _ratio(row: Row, server: str, base: str) -> str:
    if row.added:
        return ""
    a, b = row.values.get(server), row.values.get(base)
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return ""
    return f"{a / b:.2f}x"


def table(results: Results, markdown: bool = False) -> str:
    """The figures, one row each; ratios and verdicts are the proxy's (each proxy column's)."""
    servers = results.servers
    proxies = [name for name in servers if name.startswith("proxy")]
    head = ["figure", "unit", *servers]
    floor = "aiohttp-floor" in servers  # a bare aiohttp relay: what aiohttp itself costs
    for name in proxies:
        head += [f"{name}/direct", f"{name}/nginx"] + ([f"{name}/floor"] if floor else [])
    head += ["target", *(f"{name} verdict" for name in proxies)]
    body = []
    for row in rows(results):
        cells = [row.figure, row.unit, *(_fmt(row.values.get(name)) for name in servers)]
        for name in proxies:
            cells += [_ratio(row, name, "direct"), _ratio(row, name, "nginx")]
            cells += [_ratio(row, name, "aiohttp-floor")] if floor else []
        cells += [row.target, *(row.verdict(name) for name in proxies)]
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *body])
