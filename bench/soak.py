"""Soak: one daemon under a mixed load for a while, watching what must not grow.

Run: ``python -m bench.soak [--seconds 300] [--workers 6] [--every 15]``. Worker processes
(the bundled sync client) loop over a mix of calls: appends with payloads up to 3 KB, reads,
transactions committed and rolled back, ``event.append_batch``, task graphs, goal updates,
subscriptions, pipelined runs of calls, online backups, connections closed and opened again,
and broken clients: one that leaves a transaction open and goes away, one that sends
garbage, one that sends a request and closes at once. One more process runs the trio
client, its tasks sharing one connection. Every ``--every`` seconds it prints the daemon's
RSS, open descriptors and threads. At the end, once every client has gone, it exits 1 if a
worker met an error other than Busy (nothing in the load conflicts), if the daemon died or
logged an error, or if its sessions, descriptors or threads did not come back to where they
were after a first round (which opens what the daemon keeps open once used). RSS is
reported, not judged: SQLite's caches and the allocator's arenas fill up to a plateau.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import random
import shutil
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.wire import start_daemon, status_kib

# How long the daemon gets to notice the clients left (their sessions end) before the
# final sample.
SETTLE_TIMEOUT_S = 30.0
WARM_UP_S = 5.0
TASKS_PER_TRIO_CLIENT = 4
WORKER_JOIN_TIMEOUT_S = 120.0
GARBAGE = (
    struct.pack(">I", 5) + b"{bad}",  # not JSON
    b"not a frame at all\n",  # a length prefix of ~1.8 GB: over the message limit
    struct.pack(">I", 10) + b"[1,2",  # cut short
    struct.pack(">I", 3) + b"[1]",  # a batch of a non-request
)


class Usage:
    """What the daemon process holds now (from /proc). Descriptors of the database file are
    counted apart: SQLite cannot close a connection's descriptor of a file while another
    connection of the process holds a POSIX lock on it (closing any descriptor would drop
    them all), so it keeps it, and the next connection opened alike reuses it. The daemon's
    connections always hold one (WAL), so each backup running at once (on a read-only
    connection of its own) leaves one for the next. A connection left open would show
    anyway, by its WAL's descriptor."""

    def __init__(self, pid: int, database: Path) -> None:
        self.rss_mib = status_kib(pid, "VmRSS") / 1024
        self.threads = len(os.listdir(f"/proc/{pid}/task"))
        targets = [_readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        self.fd_targets = sorted(t for t in targets if t != str(database))
        self.fds = len(self.fd_targets)
        self.database_fds = len(targets) - self.fds

    def __str__(self) -> str:
        return (
            f"rss {self.rss_mib:6.1f} MiB  fds {self.fds:3d} (+{self.database_fds} of the "
            f"database)  threads {self.threads}"
        )


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed meanwhile
        return "(closed)"


def _goal(goal_id: str) -> Any:
    from omkd_client import GoalRecord

    return GoalRecord(
        goal_id=goal_id, status="active", phase="plan", goal_text="soak", project_dir="/soak"
    )


def _steps(socket_path: str, goal_id: str, rnd: random.Random) -> list[tuple[float, Any]]:
    """The mix: (weight, step(client) -> the client to go on with)."""
    from omkd_client import Client, EventInput, TaskRecord
    from omkd_client.errors import InvalidParams

    def append(c: Any) -> Any:
        c.events.append(goal_id, "step", {"blob": "x" * rnd.randint(0, 3000)})
        return c

    def read(c: Any) -> Any:
        c.events.get_by_goal(goal_id, tail=50)
        c.goals.get(goal_id)
        return c

    def transaction(c: Any) -> Any:
        with c.transaction() as tx:
            for i in range(rnd.randint(1, 20)):
                tx.events.append(goal_id, "tx", {"i": i})
        return c

    def rolled_back(c: Any) -> Any:
        tx = c.transaction()
        tx.begin()
        tx.events.append(goal_id, "rolled back", {})
        tx.rollback()
        return c

    def batch(c: Any) -> Any:
        events = [EventInput(kind="batch", payload={"i": i}) for i in range(rnd.randint(1, 500))]
        c.events.append_batch(goal_id, events)
        return c

    def task_graph(c: Any) -> Any:
        tasks = [
            TaskRecord(task_id=f"{goal_id}-{i}", goal_id=goal_id, kind="code", title="t")
            for i in range(rnd.randint(1, 100))
        ]
        c.tasks.update_task_graph(goal_id, tasks)
        return c

    def goal_update(c: Any) -> Any:
        c.goals.update_status(goal_id, "active", f"phase {rnd.randint(0, 9)}")
        return c

    def subscription(c: Any) -> Any:
        with c.events.subscribe(goal_id) as sub:
            c.events.append(goal_id, "seen", {})
            if sub.get(timeout=10) is None:
                raise RuntimeError("a subscription missed an event committed after it began")
        return c

    def reconnect(c: Any) -> Any:
        c.close()
        return Client.connect(socket_path)

    def abandoned_transaction(c: Any) -> Any:
        with Client.connect(socket_path) as other:
            other.transaction().begin()
            other.events.append(goal_id, "never committed", {})
        return c  # the daemon rolls it back when the connection goes

    def garbage(c: Any) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.connect(socket_path)
            raw.sendall(rnd.choice(GARBAGE))
        return c

    def send_and_close(c: Any) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.connect(socket_path)
            message = b'{"jsonrpc":"2.0","method":"daemon.status","id":1}'
            raw.sendall(struct.pack(">I", len(message)) + message)
        return c

    def pipelined(c: Any) -> Any:
        calls: list[tuple[str, dict[str, Any] | None]] = [
            ("event.append", {"goal_id": goal_id, "kind": "pipelined", "payload": i})
            for i in range(rnd.randint(1, 50))
        ]
        calls.insert(rnd.randrange(len(calls)), ("goal.get", {"goal_id": 1}))  # a bad one
        results = c.call_many(calls, return_exceptions=True)
        if [isinstance(r, InvalidParams) for r in results] != [m == "goal.get" for m, _ in calls]:
            raise RuntimeError(f"pipelined replies out of order or wrong: {results!r}")
        return c

    def backup(c: Any) -> Any:
        dest = Path(socket_path).parent / f"backup-{goal_id}.db"
        c.backup(dest)
        dest.unlink()
        return c

    def cleanup(c: Any) -> Any:
        c.events.delete_by_goal(goal_id)
        return c

    return [
        (35, append), (10, read), (10, transaction), (5, rolled_back), (5, batch),
        (5, task_graph), (5, goal_update), (4, subscription), (3, reconnect),
        (2, abandoned_transaction), (2, garbage), (2, send_and_close), (3, pipelined),
        (0.2, backup), (0.2, cleanup),
    ]  # fmt: skip


def worker(socket_path: str, index: int, until: float, results: Any) -> None:
    """Run the mix until ``until`` (time.time()); put (calls, busy, [unexpected errors])."""
    from omkd_client import Client
    from omkd_client.errors import Busy

    rnd = random.Random(index)
    goal_id = f"soak-{index}"
    client = Client.connect(socket_path)
    client.goals.upsert(_goal(goal_id))
    steps = _steps(socket_path, goal_id, rnd)
    weights = [w for w, _ in steps]
    calls = busy = 0
    errors: list[str] = []
    while time.time() < until:
        (step,) = rnd.choices([s for _, s in steps], weights)
        try:
            client = step(client)
            calls += 1
        except Busy:  # a lock timeout while the machine is loaded: the retry is the user's
            busy += 1
        except Exception as exc:
            errors.append(f"{step.__name__}: {type(exc).__name__}: {exc}")
            client.close()
            client = Client.connect(socket_path)
    client.close()
    results.put((calls, busy, errors))


def trio_worker(socket_path: str, index: int, until: float, results: Any) -> None:
    """The trio client's side: TASKS_PER_TRIO_CLIENT tasks share one TrioClient (their calls
    pipeline on its connection; a transaction holds the others back) until ``until``; put
    (calls, busy, [unexpected errors]) as ``worker`` does."""
    import trio

    from omkd_client.errors import Busy
    from omkd_client.trio_client import TrioClient

    goal_id = f"soak-trio-{index}"
    counts = {"calls": 0, "busy": 0}
    errors: list[str] = []

    async def task(c: TrioClient, rnd: random.Random) -> None:
        while time.time() < until:
            choice = rnd.random()
            try:
                if choice < 0.5:
                    await c.events.append(goal_id, "trio", {"blob": "y" * rnd.randint(0, 3000)})
                elif choice < 0.65:
                    await c.events.get_by_goal(goal_id, tail=20)
                elif choice < 0.8:
                    async with c.transaction() as tx:
                        for i in range(rnd.randint(1, 10)):
                            await tx.events.append(goal_id, "trio tx", {"i": i})
                elif choice < 0.9:
                    calls = [("daemon.ping", None), ("goal.get", {"goal_id": goal_id})]
                    if len(await c.call_many(calls * rnd.randint(1, 10))) % 2:
                        raise RuntimeError("call_many lost a reply")
                else:
                    subscription = await c.events.subscribe(goal_id)
                    async with subscription:
                        await c.events.append(goal_id, "trio seen", {})
                        with trio.fail_after(10):
                            await subscription.__anext__()
                counts["calls"] += 1
            except Busy:
                counts["busy"] += 1
            except Exception as exc:
                errors.append(f"trio: {type(exc).__name__}: {exc}")
                return  # the client may be unusable now; the others go on

    async def main() -> None:
        async with TrioClient.connect(socket_path) as c:
            await c.goals.upsert(_goal(goal_id))
            async with trio.open_nursery() as nursery:
                for n in range(TASKS_PER_TRIO_CLIENT):
                    nursery.start_soon(task, c, random.Random(index * 100 + n))

    trio.run(main)
    results.put((counts["calls"], counts["busy"], errors))


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def soak(
    seconds: float,
    workers: int,
    every: float,
    out: Callable[[str], None] = print,
    after_baseline: Callable[[Path], object] | None = None,
    settle_timeout: float = SETTLE_TIMEOUT_S,
) -> bool:
    """Run the soak; return whether it passed. ``after_baseline(socket_path)`` runs once the
    baseline is taken (the tests use it to leave a client behind). ``settle_timeout``: how
    long the daemon gets, before each sample with no client, to see them all gone."""
    from omkd_client import Client

    workdir = Path(tempfile.mkdtemp(prefix="omkd-soak-", dir="/tmp"))
    database = workdir / "soak.db"
    server = start_daemon(workdir, database)
    socket_path, log, pid = server.socket_path, server.log_path, server.pid

    def usage() -> Usage:
        return Usage(pid, database)

    monitor = None
    try:
        # A first round opens what the daemon keeps open once used (the checkpointer's
        # connection, the reader's WAL): the baseline is taken after it.
        warm_up = min(WARM_UP_S, seconds)
        passed = _load(socket_path, usage, warm_up, workers, warm_up, out)
        monitor = Client.connect(socket_path)  # one connection asks, the whole run
        start = _settled(usage, monitor, None, settle_timeout)
        out(f"{'start':>8}  {start}")
        if after_baseline is not None:
            after_baseline(socket_path)
        passed = _load(socket_path, usage, seconds, workers, every, out) and passed
        if server.proc.poll() is not None:
            out(f"the daemon died (exit {server.proc.returncode})")
            out("FAIL")
            return False
        end = _settled(usage, monitor, start, settle_timeout)
        out(f"{'end':>8}  {end}")
        sessions = _sessions(monitor)
        if sessions or end.fds > start.fds or end.threads > start.threads:
            out(f"not back where it started: {sessions} sessions; {start} -> {end}")
            for target in sorted((Counter(end.fd_targets) - Counter(start.fd_targets)).elements()):
                out(f"  new descriptor: {target}")
            passed = False
        logged = [
            line
            for line in log.read_text(errors="replace").splitlines()
            if " ERROR " in line or " CRITICAL " in line or "Traceback" in line
        ]
        for line in logged[:20]:
            out(f"  daemon log: {line}")
        passed = passed and not logged
    finally:
        if monitor is not None:
            monitor.close()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    out("PASS" if passed else "FAIL")
    return passed


def _load(
    socket_path: Path, usage: Callable[[], Usage], seconds: float, workers: int, every: float,
    out: Callable[[str], None],
) -> bool:  # fmt: skip
    """Run the workers for ``seconds``, sampling the daemon; False if any met an error."""
    context = multiprocessing.get_context("spawn")
    begun = time.time()
    until = begun + seconds
    results: Any = context.Queue()
    procs = [
        context.Process(target=worker, args=(str(socket_path), i, until, results))
        for i in range(workers)
    ]
    procs.append(  # and one process of the trio client
        context.Process(target=trio_worker, args=(str(socket_path), 0, until, results))
    )
    for proc in procs:
        proc.start()
    while time.time() < until:
        time.sleep(max(0.0, min(every, until - time.time())))
        out(f"{time.time() - begun:7.0f}s  {usage()}")
    totals = []
    deadline = time.monotonic() + WORKER_JOIN_TIMEOUT_S
    while len(totals) < len(procs) and time.monotonic() < deadline:
        try:
            totals.append(results.get(timeout=0.5))
        except queue.Empty:
            if not any(proc.is_alive() for proc in procs):
                break  # one died without a word (its exit code fails the round)
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
    calls = sum(t[0] for t in totals)
    busy = sum(t[1] for t in totals)
    errors = [e for t in totals for e in t[2]]
    out(f"{calls:,} calls by {workers} workers and a trio client in {seconds:g} s; {busy} Busy")
    for error in errors[:20]:
        out(f"  unexpected: {error}")
    if len(totals) < len(procs):
        out(f"  {len(procs) - len(totals)} workers did not finish")
    return not errors and len(totals) == len(procs) and not any(p.exitcode for p in procs)


def _settled(usage: Callable[[], Usage], monitor: Any, like: Usage | None, timeout: float) -> Usage:
    """The daemon's usage once no client is connected and its descriptors and threads have
    stopped changing (or are down to ``like``'s), waiting up to ``timeout`` s: the daemon
    notices a client gone when it next polls, and trio's idle worker threads leave after a
    while."""
    deadline = time.monotonic() + timeout
    _wait_for(lambda: _sessions(monitor) == 0, timeout)
    last = usage()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = usage()
        if like is not None:
            if now.fds <= like.fds and now.threads <= like.threads:
                return now
        elif (now.fds, now.threads) == (last.fds, last.threads):
            return now
        last = now
    return last


def _sessions(monitor: Any) -> int:
    """The daemon's sessions besides the monitor's own. (A connection of its own for each
    question would count the one before it, when the daemon has not seen it close yet.)"""
    return int(monitor.daemon.status().sessions) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--every", type=float, default=15.0, help="seconds between samples")
    args = parser.parse_args()
    sys.exit(0 if soak(args.seconds, args.workers, args.every) else 1)


if __name__ == "__main__":
    main()
