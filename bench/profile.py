"""Profile the daemon with py-spy on the hottest scenarios; print the top frames of each.

Run: ``python -m bench.profile [--seconds S] [--out DIR]``. For each workload (single pings,
single event.append, 8 writer processes appending, event.append_batch of 10,000, pages of
100) a fresh daemon runs under ``py-spy record --function --format raw``; the collapsed
stacks are kept in DIR and summarised as self and inclusive shares of the samples.
Needs ``pip install py-spy`` and permission to ptrace a child (as on these machines).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from bench import direct, scenarios, workload
from bench.wire import STOP_TIMEOUT_S, RawClient, Server

SAMPLE_RATE_HZ: Final = 1000
TOP: Final = 18


class ProfiledServer(Server):
    """py-spy running the daemon: stopping it stops the daemon, and py-spy writes its file."""

    def stop(self) -> None:
        for child in _children(self.proc.pid):
            os.kill(child, signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            super().stop()


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children.extend(int(c) for c in text)
    return children


def profiled_daemon(directory: Path, db_path: Path, name: str, out: Path) -> Server:
    sock = directory / f"{name}.sock"
    argv = [
        "py-spy", "record", "--function", "--format", "raw", "--rate", str(SAMPLE_RATE_HZ),
        "--output", str(out), "--",
        sys.executable, "-m", "omkd", "serve", "--socket", str(sock), "--db", str(db_path),
    ]  # fmt: skip
    return ProfiledServer(argv, sock, directory / f"{name}.log")


# Where a sample's time goes: the first rule matching a frame, from the leaf up.
CATEGORIES: Final = (
    ("_nonblocking_helper", "socket send/recv syscalls"),
    ("EpollIOManager", "epoll wait and registration"),
    ("(omkd/db/_conn.py", "SQLite statements (Conn funnel)"),
    ("jsonrpcserver/", "jsonrpcserver routing"),
    ("(inspect.py", "jsonrpcserver routing"),
    ("(omkd/db/", "omkd.db Python"),
    ("dispatch.py", "omkd.rpc dispatch, params, session"),
    ("methods.py", "omkd.rpc dispatch, params, session"),
    ("session.py", "omkd.rpc dispatch, params, session"),
    ("connection.py", "omkd.rpc connection tasks, outbox, framing"),
    ("outbox.py", "omkd.rpc connection tasks, outbox, framing"),
    ("framing.py", "omkd.rpc connection tasks, outbox, framing"),
    ("trio/", "trio scheduler, channels, cancel scopes"),
)


def _category(frames: list[str]) -> str:
    for frame in reversed(frames):
        for needle, name in CATEGORIES:
            if needle in frame:
                return name
    return "other"


_START_UP: Final = ("_find_and_load", "run_daemon (", "_serve_socket (")


def summarise(raw: Path, top: int = TOP) -> str:
    """Self and inclusive shares of the serving samples, by function and by category.

    Only stacks inside trio's run loop count, less start-up (opening and checking the
    database, building the method table) and imports.
    """
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if "unrolled_run" not in stack or any(s in stack for s in _START_UP):
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        kinds[_category(frames)] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "  (no samples)"
    lines = [f"  {total} samples while serving; by category:"]
    lines += [f"    {n / total:6.1%}  {kind}" for kind, n in kinds.most_common()]
    lines.append("  self:")
    lines += [f"    {n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    lines.append("  inclusive:")
    lines += [f"    {n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--summarise":
    for path in sys.argv[2:]:
        print(f"== {path}")
        print(summarise(Path(path)))
    raise SystemExit(0)


def _loop(seconds: float, call: Callable[[], object]) -> int:
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        for _ in range(100):
            call()
        n += 100
    return n


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--seconds", type=float, default=6.0, help="per workload")
    parser.add_argument("--out", type=Path, help="keep the collapsed stacks here")
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    workdir = Path(tempfile.mkdtemp(prefix="omkd-profile-", dir="/tmp"))
    out_dir = args.out or workdir / "stacks"
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = args.seconds
    append = {"goal_id": "rt", "kind": workload.KIND, "payload": workload.PAYLOAD}
    batch = {"goal_id": "batch", "events": workload.event_items(10_000)}
    bench = scenarios.Bench(scenarios.FULL, workdir, False, lambda m: None)

    def ping(raw: RawClient) -> None:
        _loop(seconds, lambda: raw.call("daemon.ping"))

    def single_append(raw: RawClient) -> None:
        _loop(seconds, lambda: raw.call("event.append", append))

    def batches(raw: RawClient) -> None:
        _loop(seconds / 100, lambda: raw.call("event.append_batch", batch))

    def pages(raw: RawClient) -> None:
        cursor = 0

        def page() -> None:
            nonlocal cursor
            params = {"goal_id": "log", "after_event_id": cursor, "limit": scenarios.PAGE}
            raw.call("event.get_by_goal", params)
            cursor = (cursor + scenarios.PAGE) % 90_000

        _loop(seconds, page)

    def writers(raw: RawClient) -> None:
        goals = scenarios.writer_goals(8)
        count = int(seconds * 1500)
        scenarios.run_writers(bench, "omkd", raw_path[0], goals, count=count)

    raw_path: list[Path] = []
    workloads: dict[str, Callable[[RawClient], None]] = {
        "ping": ping,
        "event.append": single_append,
        "8 writers": writers,
        "append_batch 10,000": batches,
        "pages of 100": pages,
    }
    try:
        db_path = workdir / "profile.db"
        goals = ["rt", "batch", *scenarios.writer_goals(8)]
        scenarios.build_log(db_path, 100_000, goals)
        direct.connect(db_path).close()
        for name, work in workloads.items():
            stem = name.replace(" ", "_").replace(",", "")
            out = out_dir / f"{stem}.txt"
            with profiled_daemon(workdir, db_path, stem, out) as daemon:
                raw_path[:] = [daemon.socket_path]
                with RawClient(daemon.socket_path) as raw:
                    work(raw)
            print(f"== {name} ({out})")
            print(summarise(out))
            sys.stdout.flush()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
