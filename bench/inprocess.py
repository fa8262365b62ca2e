"""The daemon's connection loop against the floor's, in one process: what omkd's code adds.

Across processes the round trips swing with the machine's scheduling by more than the daemon's
code costs. Here a client task and the server loop run in one trio process over a socketpair,
so the difference between the two columns is what omkd's own path (framing, dispatch, the
method, the reply) adds to a bare trio loop. Run: ``python -m bench.inprocess [--calls N]
[--reps N] [--method daemon.ping|event.append]``.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from pathlib import Path

import trio

from omkd.config import Config
from omkd.rpc.connection import serve_connection
from omkd.rpc.framing import NEED_DATA, FrameDecoder, Framing, encode_frame
from omkd.server import Daemon, run_daemon
from omkd_client.records import GoalRecord

from bench.floor import serve_floor_connection

GOAL = "inprocess"


def _request(method: str) -> bytes:
    params = (
        f',"params":{{"goal_id":"{GOAL}","kind":"k","payload":{{"step":1}}}}'
        if method == "event.append"
        else ""
    )
    body = f'{{"jsonrpc":"2.0","id":1,"method":"{method}"{params}}}'
    return encode_frame(Framing.LENGTH, body.encode())


async def _median_round_trip(stream: trio.SocketStream, request: bytes, calls: int) -> float:
    decoder = FrameDecoder(1 << 30)
    times: list[float] = []
    for _ in range(calls):
        start = time.perf_counter()
        await stream.send_all(request)
        while decoder.next_message() is NEED_DATA:
            decoder.receive_data(await stream.receive_some(65536))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


async def _measure(daemon: Daemon, server: str, request: bytes, calls: int, rep: int) -> float:
    ours, theirs = (
        trio.SocketStream(trio.socket.from_stdlib_socket(s)) for s in socket.socketpair()
    )
    async with trio.open_nursery() as nursery:
        if server == "floor":
            nursery.start_soon(serve_floor_connection, theirs)
        else:
            nursery.start_soon(serve_connection, daemon, theirs, 1_000_000 + rep)
        median = await _median_round_trip(ours, request, calls)
        await ours.aclose()
    return median


async def _run(calls: int, reps: int, method: str) -> None:
    with tempfile.TemporaryDirectory(prefix="omkd-inproc-") as directory:
        config = Config(
            socket_path=str(Path(directory) / "s.sock"), db_path=str(Path(directory) / "t.db")
        )
        async with trio.open_nursery() as nursery:
            daemon: Daemon = await nursery.start(run_daemon, config)
            daemon.db.goals.create(
                GoalRecord(goal_id=GOAL, status="s", phase="p", goal_text="t", project_dir="/")
            )
            request = _request(method)
            print(f"{method}: median round trip in one process (µs)")
            for rep in range(reps):
                floor = await _measure(daemon, "floor", request, calls, rep)
                omkd = await _measure(daemon, "omkd", request, calls, rep)
                print(f"  floor {floor:6.1f}   omkd {omkd:6.1f}   omkd - floor {omkd - floor:5.1f}")
            nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--method", default="daemon.ping", choices=["daemon.ping", "event.append"])
    args = parser.parse_args()
    trio.run(_run, args.calls, args.reps, args.method)


if __name__ == "__main__":
    main()
