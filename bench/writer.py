"""A writer process: appends events one call at a time and records each call's latency.

Run by the benchmark, not by people: ``python -m bench.writer MODE TARGET GOAL OUT
(--count N | --until-file PATH)``. MODE is ``omkd`` or ``floor`` (raw socket; TARGET a socket),
``client`` (the bundled client; TARGET a socket) or ``direct`` (TARGET a database file). It
connects, prints ``ready``, waits for a line on stdin, then writes; OUT receives the start
time (monotonic ns, comparable across processes) and latency (ns) of every call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import msgspec

from bench.workload import KIND, PAYLOAD

# Calls between two looks at the stop file.
STOP_CHECK_EVERY: Final = 16


class WriterResult(msgspec.Struct):
    starts_ns: list[int]
    latencies_ns: list[int]


def _appender(mode: str, target: str, goal_id: str) -> Callable[[], object]:
    if mode in ("omkd", "floor"):
        from bench.wire import RawClient

        raw = RawClient(target)
        params = msgspec.json.encode({"goal_id": goal_id, "kind": KIND, "payload": PAYLOAD})
        return lambda: raw.call("event.append", params)
    if mode == "client":
        from bench.clientlib import open_client

        client = open_client(target)
        return lambda: client.events.append(goal_id, KIND, PAYLOAD)
    if mode == "direct":
        from bench import direct

        conn = direct.connect(Path(target))
        return lambda: direct.append(conn, goal_id, PAYLOAD, int(time.time()))
    raise SystemExit(f"unknown mode {mode!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode")
    parser.add_argument("target")
    parser.add_argument("goal_id")
    parser.add_argument("out")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--count", type=int)
    group.add_argument("--until-file")
    args = parser.parse_args()
    append = _appender(args.mode, args.target, args.goal_id)
    print("ready", flush=True)
    sys.stdin.readline()
    starts: list[int] = []
    latencies: list[int] = []
    clock = time.monotonic_ns
    if args.count is not None:
        for _ in range(args.count):
            start = clock()
            append()
            starts.append(start)
            latencies.append(clock() - start)
    else:
        stop = args.until_file
        while not os.path.exists(stop):
            for _ in range(STOP_CHECK_EVERY):
                start = clock()
                append()
                starts.append(start)
                latencies.append(clock() - start)
    Path(args.out).write_bytes(msgspec.json.encode(WriterResult(starts, latencies)))


if __name__ == "__main__":
    main()
