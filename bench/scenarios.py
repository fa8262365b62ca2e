"""Every scenario of the suite. Each takes the run's ``Bench`` and appends ``Row``s to it.

Variants: ``omkd`` is the daemon through the raw socket client (bench/wire.py), ``client``
through the bundled ``omkd_client.Client``, ``floor`` the bare trio server of bench/floor.py
with the same requests, ``direct`` the same SQL from this process (or N writer processes)
straight into a SQLite file with the same schema and pragmas. Within a repetition the
variants run back to back, so drift hits them alike; rows keep every repetition's figure and
report the median.
"""

from __future__ import annotations

import functools
import math
import os
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec

from bench import direct, procstat, workload
from bench.clientlib import open_client
from bench.stats import Row, latency_summary, median
from bench.wire import REPO_ROOT, RawClient, Server, child_env, start_daemon, start_floor

# Round trips made before timing starts on each connection (imports, caches, page cache).
WARMUP_CALLS: Final = 50
PAGE: Final = 100
BACKUP_SETTLE_S: Final = 0.3
RSS_SETTLE_S: Final = 0.5


@dataclass(frozen=True)
class Sizes:
    reps: int
    round_trip_calls: int
    transactions: int
    batch_sizes: tuple[int, ...]
    task_graph: int
    big_log: int
    small_log: int
    page_reads: int
    writer_counts: tuple[int, ...]
    writer_calls: dict[int, int]
    writer_reps: int
    writer_modes: tuple[str, ...]
    idle_connections: int
    rss_reps: int
    backup_writers: int
    backup_reps: int
    backup_before_s: float
    long_read: int
    long_read_reps: int


FULL: Final = Sizes(
    reps=7,
    round_trip_calls=2000,
    transactions=10,
    batch_sizes=(1_000, 10_000),
    task_graph=1_000,
    big_log=1_000_000,
    small_log=1_000,
    page_reads=300,
    writer_counts=(8, 32),
    writer_calls={8: 3_000, 32: 1_000},
    writer_reps=5,
    writer_modes=("floor", "omkd", "client", "direct"),
    idle_connections=300,
    rss_reps=3,
    backup_writers=4,
    backup_reps=2,
    backup_before_s=1.0,
    long_read=20_000,
    long_read_reps=3,
)

QUICK: Final = Sizes(
    reps=2,
    round_trip_calls=100,
    transactions=2,
    batch_sizes=(1_000, 10_000),
    task_graph=1_000,
    big_log=20_000,
    small_log=1_000,
    page_reads=20,
    writer_counts=(8, 32),
    writer_calls={8: 50, 32: 20},
    writer_reps=1,
    writer_modes=("omkd", "direct"),
    idle_connections=300,
    rss_reps=1,
    backup_writers=2,
    backup_reps=1,
    backup_before_s=0.2,
    long_read=2_000,
    long_read_reps=1,
)

MAIN_GOALS: Final = ["rt", "tx", "batch", "graph"]


def writer_goals(count: int) -> list[str]:
    return [f"w{i}" for i in range(count)]


@dataclass
class Bench:
    """One run: its sizes, its directory, the servers and connections it has open."""

    sizes: Sizes
    workdir: Path
    with_client: bool
    progress: Callable[[str], None]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def row(self, scenario: str, metric: str, unit: str, better: str = "lower") -> Row:
        row = Row(scenario, metric, unit, better)
        self.rows.append(row)
        return row

    @property
    def main_db(self) -> Path:
        return self.workdir / "main.db"

    @property
    def direct_db(self) -> Path:
        return self.workdir / "direct.db"

    @property
    def big_db(self) -> Path:
        return self.workdir / "big.db"

    @property
    def small_db(self) -> Path:
        return self.workdir / "log1k.db"


# -- set-up ------------------------------------------------------------------------------


def build_databases(bench: Bench, *, logs: bool = True) -> None:
    """The main and direct databases (same goals), and (``logs``) the two event logs."""
    goals = MAIN_GOALS + writer_goals(max(bench.sizes.writer_counts))
    direct.create_database(bench.main_db, goals)
    direct.create_database(bench.direct_db, goals)
    if not logs:
        return
    started = time.perf_counter()
    build_log(bench.big_db, bench.sizes.big_log, writer_goals(bench.sizes.backup_writers))
    bench.info["big_db_build_s"] = round(time.perf_counter() - started, 3)
    bench.info["big_db_bytes"] = bench.big_db.stat().st_size
    build_log(bench.small_db, bench.sizes.small_log, [])


def build_log(path: Path, events: int, other_goals: list[str]) -> None:
    """A database whose goal "log" has ``events`` events (ids 1..events), built fast.

    The schema comes from omkd; the rows go in with plain SQL in one transaction, journal off
    (a crash would only lose the benchmark's scratch file), then the file returns to WAL.
    """
    direct.create_database(path, ["log", *other_goals])
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("BEGIN")
        chunk = 50_000
        created_at = int(time.time())
        for start in range(0, events, chunk):
            rows = (
                direct.event_row("log", workload.KIND, workload.large_payload(i), created_at)
                for i in range(start, min(events, start + chunk))
            )
            conn.executemany(direct.INSERT_EVENT, rows)
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()


@contextmanager
def servers(bench: Bench) -> Iterator[tuple[Server, Server]]:
    """The floor and the main daemon, stopped on exit."""
    with ExitStack() as stack:
        floor = stack.enter_context(start_floor(bench.workdir))
        daemon = stack.enter_context(start_daemon(bench.workdir, bench.main_db, "main"))
        yield floor, daemon


# Where a one-client scenario runs its client: on another CPU than the servers, or on theirs.
TWO_CPUS: Final = "two CPUs"
ONE_CPU: Final = "one CPU"


@contextmanager
def placed(bench: Bench, placement: str, *servers: Server) -> Iterator[None]:
    """Pin the servers to one CPU and this process, their one client, to another (TWO_CPUS)
    or to the same (ONE_CPU), for the scenarios of one client; restore all after.

    Unpinned, the scheduler puts a request-reply pair on one CPU or on two and keeps it
    there, and the floor and the daemon can land differently in one run (a ping/floor ratio
    of 1.56 against 1.04-1.07 placed alike). Across two CPUs each leg of a round trip wakes
    a halted CPU, which on these virtual machines takes ~20-35 µs or ~10-20 µs depending on
    how long it was halted (the host polls briefly before it lets the CPU sleep): a server
    that answers 3 µs later than the floor can come back 27 µs later (bench/README.md). On
    one CPU no leg wakes another CPU, and a round trip is the work of both processes. The
    round trips are measured both ways. With one CPU there is nothing to pin.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        yield
        return
    pids = [server.pid for server in servers]
    before = {pid: os.sched_getaffinity(pid) for pid in [0, *pids]}
    client_cpu = cpus[0] if placement == ONE_CPU else cpus[1]
    for pid in pids:
        os.sched_setaffinity(pid, {cpus[0]})
    os.sched_setaffinity(0, {client_cpu})
    bench.info[f"placement, {placement}"] = f"servers on CPU {cpus[0]}, client on CPU {client_cpu}"
    try:
        yield
    finally:
        for pid, mask in before.items():
            with suppress(ProcessLookupError):  # a server that died meanwhile
                os.sched_setaffinity(pid, mask)


def _timed_calls(call: Callable[[], object], count: int) -> float:
    """Median latency (µs) of ``count`` calls, after a warm-up."""
    for _ in range(WARMUP_CALLS):
        call()
    clock = time.perf_counter_ns
    latencies = []
    for _ in range(count):
        start = clock()
        call()
        latencies.append(clock() - start)
    return median(latencies) / 1e3


def now() -> int:
    return int(time.time())


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - start) / 1e3


# -- scenarios ---------------------------------------------------------------------------


def round_trips(bench: Bench, floor: Server, daemon: Server, placement: str = TWO_CPUS) -> None:
    """daemon.ping, goal.get and event.append, one call at a time on one connection; the
    rows of the ONE_CPU placement are named so ("round trip daemon.ping, one CPU")."""
    sizes = bench.sizes
    append_params = {"goal_id": "rt", "kind": workload.KIND, "payload": workload.PAYLOAD}
    with ExitStack() as stack:
        to_floor = stack.enter_context(RawClient(floor.socket_path))
        raw = stack.enter_context(RawClient(daemon.socket_path))
        client = stack.enter_context(open_client(daemon.socket_path)) if bench.with_client else None
        conn = direct.connect(bench.direct_db)
        stack.callback(conn.close)
        cases: list[tuple[str, Any, Any, Any]] = [
            ("daemon.ping", None, lambda: client.daemon.ping(), None),
            (
                "goal.get",
                {"goal_id": "rt"},
                lambda: client.goals.get("rt"),
                lambda: direct.get_goal(conn, "rt"),
            ),
            (
                "event.append",
                append_params,
                lambda: client.events.append("rt", workload.KIND, workload.PAYLOAD),
                lambda: direct.append(conn, "rt", workload.PAYLOAD, int(time.time())),
            ),
        ]
        for method, params, via_client, via_direct in cases:
            suffix = f", {ONE_CPU}" if placement == ONE_CPU else ""
            bench.progress(f"round trips: {method}{suffix}")
            row = bench.row(f"round trip {method}{suffix}", "median latency", "µs")
            for _ in range(sizes.reps):
                n = sizes.round_trip_calls
                row.add("floor", _timed_calls(lambda m=method, p=params: to_floor.call(m, p), n))
                row.add("omkd", _timed_calls(lambda m=method, p=params: raw.call(m, p), n))
                if client is not None:
                    row.add("client", _timed_calls(via_client, n))
                if via_direct is not None:
                    row.add("direct", _timed_calls(via_direct, n))


def transaction_of_100(bench: Bench, floor: Server, daemon: Server) -> None:
    """tx.begin, 100 event.append, tx.commit; sequential and pipelined."""
    bench.progress("transaction of 100 writes")
    writes = 100
    params = {"goal_id": "tx", "kind": workload.KIND, "payload": workload.PAYLOAD}
    calls = [("tx.begin", None)] + [("event.append", params)] * writes + [("tx.commit", None)]
    row = bench.row("transaction of 100 event.append", "time per transaction", "µs")
    piped = bench.row("transaction of 100 event.append, pipelined", "time per transaction", "µs")
    with ExitStack() as stack:
        to_floor = stack.enter_context(RawClient(floor.socket_path))
        raw = stack.enter_context(RawClient(daemon.socket_path))
        client = stack.enter_context(open_client(daemon.socket_path)) if bench.with_client else None
        conn = direct.connect(bench.direct_db)
        stack.callback(conn.close)

        def sequential(c: RawClient) -> None:
            for method, p in calls:
                c.call(method, p)

        def with_client() -> None:
            with client.transaction() as tx:
                for _ in range(writes):
                    tx.events.append("tx", workload.KIND, workload.PAYLOAD)

        def in_sqlite() -> None:
            conn.execute("BEGIN IMMEDIATE")
            now = int(time.time())
            for _ in range(writes):
                direct.append(conn, "tx", workload.PAYLOAD, now)
            conn.execute("COMMIT")

        sequential(raw)  # warm-up
        for _ in range(bench.sizes.reps):
            n = bench.sizes.transactions
            row.add("floor", median([_timed(lambda: sequential(to_floor)) for _ in range(n)]))
            row.add("omkd", median([_timed(lambda: sequential(raw)) for _ in range(n)]))
            if client is not None:
                row.add("client", median([_timed(with_client) for _ in range(n)]))
            row.add("direct", median([_timed(in_sqlite) for _ in range(n)]))
            piped.add(
                "floor", median([_timed(lambda: to_floor.call_many(calls)) for _ in range(n)])
            )
            piped.add("omkd", median([_timed(lambda: raw.call_many(calls)) for _ in range(n)]))
            piped.add("direct", row.runs["direct"][-1])


def append_batches(bench: Bench, floor: Server, daemon: Server) -> None:
    """event.append_batch of 1,000 and 10,000 events, versus executemany in one transaction."""
    with ExitStack() as stack:
        to_floor = stack.enter_context(RawClient(floor.socket_path))
        raw = stack.enter_context(RawClient(daemon.socket_path))
        client = stack.enter_context(open_client(daemon.socket_path)) if bench.with_client else None
        conn = direct.connect(bench.direct_db)
        stack.callback(conn.close)
        for size in bench.sizes.batch_sizes:
            bench.progress(f"event.append_batch of {size}")
            _append_batch(bench, size, to_floor, raw, client, conn)


def _append_batch(
    bench: Bench,
    size: int,
    to_floor: RawClient,
    raw: RawClient,
    client: Any,
    conn: sqlite3.Connection,
) -> None:
    from omkd_client import EventInput

    items = workload.event_items(size)
    inputs = [EventInput(kind=workload.KIND, payload=workload.PAYLOAD) for _ in items]
    payloads = [workload.PAYLOAD] * size
    params = {"goal_id": "batch", "events": items}
    row = bench.row(f"event.append_batch of {size:,}", "events per second", "ev/s", "higher")

    def rate(call: Callable[[], object]) -> float:
        return size / _timed(call) * 1e6

    raw.call("event.append_batch", params)  # warm-up
    for _ in range(bench.sizes.reps):
        row.add("floor", rate(lambda: to_floor.call("x", params)))
        row.add("omkd", rate(lambda: raw.call("event.append_batch", params)))
        if client is not None:
            row.add("client", rate(lambda: client.events.append_batch("batch", inputs)))
        row.add("direct", rate(lambda: direct.append_batch(conn, "batch", payloads, now())))


def task_graph(bench: Bench, floor: Server, daemon: Server) -> None:
    """task.update_task_graph of 1,000 tasks, versus DELETE and executemany in one transaction."""
    from omkd_client import TaskRecord

    size = bench.sizes.task_graph
    bench.progress(f"task.update_task_graph of {size}")
    tasks = workload.tasks(size, "graph")
    records = [TaskRecord(goal_id="graph", **t) for t in tasks]
    params = {"goal_id": "graph", "tasks": tasks}
    row = bench.row(f"task.update_task_graph of {size:,}", "time per call", "ms")
    with ExitStack() as stack:
        to_floor = stack.enter_context(RawClient(floor.socket_path))
        raw = stack.enter_context(RawClient(daemon.socket_path))
        client = stack.enter_context(open_client(daemon.socket_path)) if bench.with_client else None
        conn = direct.connect(bench.direct_db)
        stack.callback(conn.close)
        raw.call("task.update_task_graph", params)  # warm-up
        for _ in range(bench.sizes.reps):
            row.add("floor", _timed(lambda: to_floor.call("x", params)) / 1e3)
            row.add("omkd", _timed(lambda: raw.call("task.update_task_graph", params)) / 1e3)
            if client is not None:
                row.add(
                    "client",
                    _timed(lambda: client.tasks.update_task_graph("graph", records)) / 1e3,
                )
            row.add("direct", _timed(lambda: direct.replace_task_graph(conn, "graph", tasks)) / 1e3)


class _EventId(msgspec.Struct):
    event_id: int


_PAGE_IDS: Final = msgspec.json.Decoder(list[_EventId])
_WALK: Final = 5  # pages read one after the other from each random starting cursor


def pages(bench: Bench) -> None:
    """Pages of 100 by cursor from the large log and from a 1,000-event log."""
    sizes = bench.sizes
    metric = "median latency per page"
    rows = {
        "big": bench.row(f"page of 100 by cursor, {sizes.big_log:,}-event log", metric, "µs"),
        "small": bench.row(f"page of 100 by cursor, {sizes.small_log:,}-event log", metric, "µs"),
    }
    rng = random.Random(6)
    with ExitStack() as stack:
        daemons = {
            "big": stack.enter_context(start_daemon(bench.workdir, bench.big_db, "big")),
            "small": stack.enter_context(start_daemon(bench.workdir, bench.small_db, "small")),
        }
        logs = {"big": (bench.big_db, sizes.big_log), "small": (bench.small_db, sizes.small_log)}
        bench.progress("pages by cursor")
        readers: dict[str, dict[str, Callable[[int], tuple[float, int]]]] = {}
        for key, (db_path, _events) in logs.items():
            readers[key] = _page_readers(bench, stack, daemons[key], db_path)
        reads = max(1, sizes.page_reads // _WALK)
        for _ in range(sizes.reps):
            for key, (_db_path, events) in logs.items():
                starts = [rng.randrange(0, events - PAGE * _WALK) for _ in range(reads)]
                for variant, read in readers[key].items():
                    latencies = []
                    for start in starts:
                        cursor = start
                        for _ in range(_WALK):
                            elapsed, cursor = read(cursor)
                            latencies.append(elapsed)
                    rows[key].add(variant, median(latencies) / 1e3)
    bench.info["page_reads_per_rep"] = max(1, sizes.page_reads // _WALK) * _WALK


def _page_readers(
    bench: Bench, stack: ExitStack, daemon: Server, db_path: Path
) -> dict[str, Callable[[int], tuple[float, int]]]:
    """For each variant, a function reading the page after a cursor: (ns, next cursor)."""
    raw = stack.enter_context(RawClient(daemon.socket_path))
    conn = direct.connect(db_path)
    stack.callback(conn.close)
    clock = time.perf_counter_ns

    def via_raw(cursor: int) -> tuple[float, int]:
        params = {"goal_id": "log", "after_event_id": cursor, "limit": PAGE}
        start = clock()
        body = raw.call("event.get_by_goal", params)
        elapsed = clock() - start
        return elapsed, _PAGE_IDS.decode(body)[-1].event_id

    def via_direct(cursor: int) -> tuple[float, int]:
        start = clock()
        body = direct.page(conn, "log", cursor, PAGE)
        elapsed = clock() - start
        return elapsed, _PAGE_IDS.decode(body)[-1].event_id

    readers = {"omkd": via_raw, "direct": via_direct}
    if bench.with_client:
        client = stack.enter_context(open_client(daemon.socket_path))

        def via_client(cursor: int) -> tuple[float, int]:
            start = clock()
            page = client.events.get_by_goal("log", after_event_id=cursor, limit=PAGE)
            return clock() - start, page[-1].event_id

        readers["client"] = via_client
    return readers


# -- writer processes --------------------------------------------------------------------


def run_writers(
    bench: Bench,
    mode: str,
    target: Path,
    goals: list[str],
    *,
    count: int | None = None,
    until_file: Path | None = None,
    during: Callable[[], Any] | None = None,
    layout: int = 0,
) -> tuple[list[tuple[int, int]], Any]:
    """Start one writer process per goal (environment padded for ``layout``, see
    ``child_env``), release them together, return every call's (start ns, latency ns) and
    what ``during`` returned (it runs while they write)."""
    procs = []
    outs = []
    stop_args = ["--count", str(count)] if count is not None else ["--until-file", str(until_file)]
    try:
        for index, goal_id in enumerate(goals):
            out = bench.workdir / f"writer-{mode}-{index}.json"
            outs.append(out)
            argv = [sys.executable, "-m", "bench.writer", mode, str(target), goal_id, str(out)]
            procs.append(
                subprocess.Popen(
                    argv + stop_args,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    cwd=REPO_ROOT,
                    env=child_env(layout),
                )
            )
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"a {mode} writer failed to start (exit {proc.wait()})")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        result = during() if during is not None else None
        for proc in procs:
            if proc.wait() != 0:
                raise RuntimeError(f"a {mode} writer failed with exit status {proc.returncode}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    calls: list[tuple[int, int]] = []
    for out in outs:
        data = msgspec.json.decode(out.read_bytes())
        calls.extend(zip(data["starts_ns"], data["latencies_ns"], strict=True))
        out.unlink()
    return calls, result


def _summary(calls: list[tuple[int, int]]) -> dict[str, float]:
    if not calls:
        return latency_summary([], 0)
    begin = min(s for s, _ in calls)
    end = max(s + lat for s, lat in calls)
    return latency_summary([lat for _, lat in calls], end - begin)


def concurrent_writers(bench: Bench, floor: Server, daemon: Server) -> None:
    """N writer processes, each appending its own goal's events one call at a time."""
    sizes = bench.sizes
    targets = {
        "floor": floor.socket_path,
        "omkd": daemon.socket_path,
        "client": daemon.socket_path,
        "direct": bench.direct_db,
    }
    modes = [m for m in sizes.writer_modes if m != "client" or bench.with_client]
    for writers in sizes.writer_counts:
        count = sizes.writer_calls[writers]
        scenario = f"{writers} writer processes, event.append"
        rows = {
            "throughput": bench.row(scenario, "throughput", "calls/s", "higher"),
            "p50_ms": bench.row(scenario, "p50 latency", "ms"),
            "p99_ms": bench.row(scenario, "p99 latency", "ms"),
            "max_ms": bench.row(scenario, "max latency", "ms"),
        }
        per_commit = bench.row(scenario, "writes per COMMIT", "writes", "higher")
        usage_rows = {
            "server_cpu_us_per_call": bench.row(scenario, "server CPU per call", "us"),
            "server_runqueue_wait": bench.row(scenario, "server waiting for a CPU", "share"),
            "machine_idle": bench.row(scenario, "machine idle", "share"),
            "machine_steal": bench.row(scenario, "machine steal (host)", "share"),
        }
        servers = {"floor": floor, "omkd": daemon, "client": daemon}
        for rep in range(sizes.writer_reps):
            # Each repetition another memory layout for every process (see child_env).
            floor.restart(layout=rep)
            daemon.restart(layout=rep)
            for mode in modes:
                bench.progress(f"{writers} writers, {mode} (repetition {rep + 1})")
                before = _write_counters(daemon) if mode == "omkd" else None
                server = servers.get(mode)
                calls, started = run_writers(
                    bench,
                    mode,
                    targets[mode],
                    writer_goals(writers),
                    count=count,
                    layout=rep,
                    during=lambda s=server: _usage_sample(s),
                )
                ended = _usage_sample(server)
                summary = _summary(calls)
                for key, row in rows.items():
                    row.add(mode, summary[key])
                used = _usage_between(started, ended, len(calls))
                for key, row in usage_rows.items():
                    value = getattr(used, key)
                    if not math.isnan(value):
                        row.add(mode, value)
                if before is not None:
                    writes, commits = _write_counters(daemon)
                    per_commit.add(mode, (writes - before[0]) / max(commits - before[1], 1))


_UsageSample = tuple[float, procstat.ServerSample | None, procstat.MachineSample]


def _usage_sample(server: Server | None) -> _UsageSample:
    return (
        time.monotonic(),
        None if server is None else procstat.sample_server(server.pid),
        procstat.sample_machine(),
    )


def _usage_between(start: _UsageSample, end: _UsageSample, calls: int) -> procstat.Usage:
    """From the writers' release to their end (their exit included: a few ms in seconds)."""
    servers = None
    if start[1] is not None and end[1] is not None:
        servers = (start[1], end[1])
    return procstat.usage(servers, (start[2], end[2]), end[0] - start[0], calls)


def _write_counters(daemon: Server) -> tuple[int, int]:
    """The daemon's single writes and the COMMITs they took, from daemon.status."""
    with RawClient(daemon.socket_path) as raw:
        status = msgspec.json.decode(raw.call("daemon.status"))
    return status["single_writes"], status["single_write_commits"]


def idle_connections(bench: Bench) -> None:
    """Daemon (and floor) RSS with N idle connections, each having made one call."""
    n = bench.sizes.idle_connections
    total = bench.row(f"{n} idle connections", "RSS", "MiB")
    before = bench.row(f"{n} idle connections", "RSS before connecting", "MiB")
    each = bench.row(f"{n} idle connections", "RSS per connection", "KiB")
    db_path = bench.workdir / "rss.db"
    direct.create_database(db_path, ["rt"])
    for rep in range(bench.sizes.rss_reps):
        for variant in ("floor", "omkd"):
            bench.progress(f"{n} idle connections, {variant} (repetition {rep + 1})")
            if variant == "floor":
                server = start_floor(bench.workdir)
            else:
                server = start_daemon(bench.workdir, db_path, "rss")
            with server, ExitStack() as stack:
                first = stack.enter_context(RawClient(server.socket_path))
                for _ in range(WARMUP_CALLS):
                    first.call("goal.get", {"goal_id": "rt"})
                time.sleep(RSS_SETTLE_S)
                rss0 = server.rss_kib()
                for _ in range(n):
                    stack.enter_context(RawClient(server.socket_path)).call("daemon.ping")
                time.sleep(RSS_SETTLE_S)
                rss1 = server.rss_kib()
            before.add(variant, rss0 / 1024)
            total.add(variant, rss1 / 1024)
            each.add(variant, (rss1 - rss0) / n)


def backup_under_writers(bench: Bench) -> None:
    """db.backup of the large database while writer processes append, vs a direct backup."""
    sizes = bench.sizes
    goals = writer_goals(sizes.backup_writers)
    mib = bench.info.get("big_db_bytes", 0) / 2**20
    scenario = f"backup of {mib:,.0f} MiB under {len(goals)} writers"
    rows = {
        "time": bench.row(scenario, "backup time", "s"),
        "p99_during": bench.row(scenario, "writers' p99 during backup", "ms"),
        "max_during": bench.row(scenario, "writers' max during backup", "ms"),
        "p99_before": bench.row(scenario, "writers' p99 before backup", "ms"),
        "calls_during": bench.row(scenario, "writers' calls/s during backup", "calls/s", "higher"),
    }
    dest = bench.workdir / "backup.db"
    stop = bench.workdir / "stop-writers"

    def measure(mode: str, target: Path, backup: Callable[[], None]) -> None:
        stop.unlink(missing_ok=True)
        during = functools.partial(
            _beside_writers, backup, sizes.backup_before_s, BACKUP_SETTLE_S, stop
        )
        calls, (begin, end) = run_writers(
            bench, mode, target, goals, until_file=stop, during=during
        )
        dest.unlink(missing_ok=True)
        # Calls that overlap the backup: one stalled across all of it counts too (a short
        # backup could otherwise see no call start, with every writer in the busy handler).
        inside = [lat for s, lat in calls if s < end and s + lat > begin]
        earlier = [lat for s, lat in calls if s < begin]
        summary = latency_summary(inside, end - begin)
        variant = "omkd" if mode == "omkd" else "direct"
        rows["time"].add(variant, (end - begin) / 1e9)
        rows["p99_during"].add(variant, summary["p99_ms"])
        rows["max_during"].add(variant, summary["max_ms"])
        rows["p99_before"].add(variant, latency_summary(earlier, 1)["p99_ms"])
        rows["calls_during"].add(variant, summary["throughput"])

    for rep in range(sizes.backup_reps):
        bench.progress(f"db.backup under writers, omkd (repetition {rep + 1})")
        with (
            start_daemon(bench.workdir, bench.big_db, "big") as daemon,
            RawClient(daemon.socket_path) as raw,
        ):
            measure("omkd", daemon.socket_path, lambda: raw.call("db.backup", {"dest": str(dest)}))
        bench.progress(f"direct online backup under direct writers (repetition {rep + 1})")
        measure("direct", bench.big_db, lambda: _online_backup(bench.big_db, dest))


def _beside_writers(
    call: Callable[[], object], before_s: float, after_s: float, stop: Path
) -> tuple[int, int]:
    """What runs while ``run_writers``'s writers write (until ``stop`` appears): ``call``
    after ``before_s``, then ``after_s`` more; returns when ``call`` began and ended (ns).
    (The caller removes ``stop`` before starting the writers.)"""
    time.sleep(before_s)
    begin = time.monotonic_ns()
    call()
    end = time.monotonic_ns()
    time.sleep(after_s)
    stop.touch()
    return begin, end


def _online_backup(source: Path, dest: Path) -> None:
    """What the daemon's backup runs: SQLite's online backup API in one step, then a sync."""
    conn = direct.connect(source)
    copy = sqlite3.connect(dest, isolation_level=None)
    try:
        copy.execute("PRAGMA journal_mode = OFF")
        copy.execute("PRAGMA synchronous = OFF")
        conn.backup(copy, pages=-1)
        copy.execute("PRAGMA journal_mode = DELETE")
    finally:
        copy.close()
        conn.close()
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- a long call beside a writer ------------------------------------------------------------

LONG_READ_LEAD_S: Final = 0.2  # the writer's calls before the long read, and after it
# long_call_rows for the daemon that runs every call on its event loop (the variant "before").
ALL_ON_THE_LOOP: Final = 2**62


def long_read(bench: Bench) -> None:
    """A page of ``long_read`` events from the large log while a writer process appends: the
    read's time and the writer's latency meanwhile; omkd (the read in a worker thread), omkd
    with every call on its event loop, and direct SQLite (a connection of the benchmark's,
    the writer's of its own)."""
    sizes = bench.sizes
    count = sizes.long_read
    scenario = f"page of {count:,} events beside a writer"
    rows = {
        "time": bench.row(scenario, "read time", "ms"),
        "max": bench.row(scenario, "writer's max during the read", "ms"),
        "p99": bench.row(scenario, "writer's p99 during the read", "ms"),
    }
    inline = f"{scenario}, the read on the event loop"
    inline_rows = {
        "time": bench.row(inline, "read time", "ms"),
        "max": bench.row(inline, "writer's max during the read", "ms"),
    }
    stop = bench.workdir / "stop-writers"
    cursor = random.Random(7).randrange(0, sizes.big_log - count)
    inline_config = bench.workdir / "all-on-the-loop.toml"
    inline_config.write_text(f"long_call_rows = {ALL_ON_THE_LOOP}\n")

    def measure(mode: str, target: Path, read: Callable[[], object], into: dict[str, Row]) -> None:
        stop.unlink(missing_ok=True)
        during = functools.partial(_beside_writers, read, LONG_READ_LEAD_S, LONG_READ_LEAD_S, stop)
        calls, (begin, end) = run_writers(
            bench, mode, target, ["w0"], until_file=stop, during=during
        )
        inside = [lat for s, lat in calls if s < end and s + lat > begin]
        summary = latency_summary(inside, end - begin)
        variant = "omkd" if mode == "omkd" else "direct"
        into["time"].add(variant, (end - begin) / 1e6)
        into["max"].add(variant, summary["max_ms"])
        if "p99" in into:
            into["p99"].add(variant, summary["p99_ms"])

    params = {"goal_id": "log", "after_event_id": cursor, "limit": count}
    for rep in range(sizes.long_read_reps):
        for name, config, into in (
            ("omkd", None, rows),
            ("omkd, on the loop", inline_config, inline_rows),
        ):
            bench.progress(f"long read beside a writer, {name} (repetition {rep + 1})")
            with (
                start_daemon(bench.workdir, bench.big_db, "long", config) as daemon,
                RawClient(daemon.socket_path) as raw,
            ):
                measure(
                    "omkd", daemon.socket_path, lambda: raw.call("event.get_by_goal", params), into
                )
        bench.progress(f"long read beside a writer, direct (repetition {rep + 1})")
        conn = direct.connect(bench.big_db)
        try:
            page = functools.partial(direct.page, conn, "log", cursor, count)
            measure("direct", bench.big_db, page, rows)
        finally:
            conn.close()
