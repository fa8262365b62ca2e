"""The targets of issue 6, the printed table and the JSON document."""

from __future__ import annotations

import math
import os
import platform
import sqlite3
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from bench.stats import Row

MiB = 1024 * 1024


@dataclass(frozen=True)
class Target:
    name: str
    scenario: str
    metric: str
    how: str  # "ratio:VARIANT/BASELINE" or "value:VARIANT"
    op: str  # "<=" or ">="
    limit: float

    def evaluate(self, rows: list[Row]) -> dict[str, Any]:
        row = next(
            (r for r in rows if r.scenario == self.scenario and r.metric == self.metric), None
        )
        value = math.nan
        if row is not None:
            kind, _, spec = self.how.partition(":")
            if kind == "ratio":
                variant, _, baseline = spec.partition("/")
                value = row.ratio(variant, baseline)
            else:
                value = row.value(spec)
        ok = not math.isnan(value) and (
            value <= self.limit if self.op == "<=" else value >= self.limit
        )
        return {
            "target": self.name,
            "value": None if math.isnan(value) else round(value, 4),
            "op": self.op,
            "limit": self.limit,
            "pass": ok,
        }


def targets(big_log: int, small_log: int, idle: int) -> list[Target]:
    rt = "median latency"
    return [
        Target("daemon.ping median / floor", "round trip daemon.ping", rt,
               "ratio:omkd/floor", "<=", 1.5),
        Target("event.append median / floor", "round trip event.append", rt,
               "ratio:omkd/floor", "<=", 2.5),
        Target("daemon.ping median / floor, one CPU", "round trip daemon.ping, one CPU", rt,
               "ratio:omkd/floor", "<=", 1.5),
        Target("event.append median / floor, one CPU", "round trip event.append, one CPU", rt,
               "ratio:omkd/floor", "<=", 2.5),
        Target("append_batch 1,000 events/s / direct executemany",
               "event.append_batch of 1,000", "events per second", "ratio:omkd/direct", ">=", 0.5),
        Target("append_batch 10,000 events/s / direct executemany",
               "event.append_batch of 10,000", "events per second", "ratio:omkd/direct", ">=", 0.5),
        Target("8 writers: throughput / direct multi-process",
               "8 writer processes, event.append", "throughput", "ratio:omkd/direct", ">=", 0.5),
        Target("8 writers: max latency / direct's",
               "8 writer processes, event.append", "max latency", "ratio:omkd/direct", "<=", 0.5),
        Target(f"page of 100: {big_log:,}-event log / {small_log:,}-event log",
               "", "", "", "<=", 1.5),
        Target(f"daemon RSS with {idle} idle connections (MiB)", f"{idle} idle connections",
               "RSS", "value:omkd", "<=", 80.0),
    ]  # fmt: skip


def evaluate_targets(
    rows: list[Row], big_log: int, small_log: int, idle: int
) -> list[dict[str, Any]]:
    results = []
    for target in targets(big_log, small_log, idle):
        if target.scenario:
            results.append(target.evaluate(rows))
            continue
        # The page target compares two rows: the same variant at two log sizes.
        metric = "median latency per page"
        big = _find(rows, f"page of 100 by cursor, {big_log:,}-event log", metric)
        small = _find(rows, f"page of 100 by cursor, {small_log:,}-event log", metric)
        value = big.value("omkd") / small.value("omkd") if big and small else math.nan
        results.append(
            {
                "target": target.name,
                "value": None if math.isnan(value) else round(value, 4),
                "op": target.op,
                "limit": target.limit,
                "pass": not math.isnan(value) and value <= target.limit,
            }
        )
    return results


def _find(rows: list[Row], scenario: str, metric: str) -> Row | None:
    return next((r for r in rows if r.scenario == scenario and r.metric == metric), None)


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(
                (
                    line.split(":", 1)[1].strip()
                    for line in cpuinfo
                    if line.startswith("model name")
                ),
                "",
            )
    except OSError:
        pass
    versions = {}
    for package in ("trio", "msgspec", "jsonrpcserver", "omkd", "omkd-client"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "packages": versions,
    }


VARIANTS = ("omkd", "client", "floor", "direct")


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "-"
    if abs(x) >= 10_000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_against(x: float, limit: float) -> str:
    """``x`` as the table prints it, with more digits where that would round it onto the
    target's limit: a ratio of 0.4998 against ">= 0.5" reads 0.4998, not a failing 0.50."""
    text = _fmt(x)
    digits = 2
    while x != limit and float(text.replace(",", "")) == limit and digits < 6:
        digits += 1
        text = f"{x:.{digits}f}"
    return text


def table(rows: list[Row], target_results: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """The human table: medians per variant and omkd's ratios to the baselines."""
    head = ["scenario", "metric", "unit", *VARIANTS, "omkd/floor", "omkd/direct"]
    body = []
    for row in rows:
        values = [_fmt(row.value(v)) if v in row.runs else "-" for v in VARIANTS]
        ratios = [
            _fmt(row.ratio("omkd", b)) + "x" if b in row.runs and "omkd" in row.runs else "-"
            for b in ("floor", "direct")
        ]
        body.append([row.scenario, row.metric, row.unit, *values, *ratios])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]
    lines = []
    for i, cells in enumerate([head, *body]):
        lines.append(
            "  ".join(
                c.ljust(w) if j < 3 else c.rjust(w)
                for j, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("targets (omkd through the raw socket client; medians over repetitions):")
    for t in target_results:
        value = "-" if t["value"] is None else fmt_against(t["value"], t["limit"])
        verdict = "n/a " if t["value"] is None else "PASS" if t["pass"] else "FAIL"
        lines.append(f"  {verdict}  {t['target']}: {value} (target {t['op']} {t['limit']:g})")
    m = info["machine"]
    lines.append("")
    lines.append(
        f"machine: {m['cpu_count']} CPUs ({m['cpu_model']}), Python {m['python']}, "
        f"SQLite {m['sqlite']}, {m['platform']}"
    )
    return "\n".join(lines)
