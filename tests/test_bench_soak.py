"""The soak (bench/soak.py) in a few seconds: the daemon takes the whole mixed load, broken
clients included, without an unexpected error, and gives back every session, descriptor and
thread; a client left connected is caught."""

from __future__ import annotations

import socket
from pathlib import Path

from bench.soak import soak

SECONDS = 4.0
WORKERS = 3


def test_a_short_soak_passes_and_reports_its_load() -> None:
    lines: list[str] = []
    assert soak(SECONDS, WORKERS, every=SECONDS, out=lines.append), "\n".join(lines)
    rounds = [line for line in lines if f"by {WORKERS} workers" in line]
    assert len(rounds) == 2  # the warm-up, then the soak itself
    assert all(int(line.split()[0].replace(",", "")) > 0 for line in rounds)
    assert lines[-1] == "PASS"


def test_a_client_left_connected_fails_the_soak() -> None:
    left: list[socket.socket] = []

    def leave_one(socket_path: Path) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(socket_path))
        left.append(sock)

    lines: list[str] = []
    try:
        passed = soak(
            1.0, 1, every=1.0, out=lines.append, after_baseline=leave_one, settle_timeout=3.0
        )
    finally:
        for sock in left:
            sock.close()
    assert not passed, lines
    assert any(line.startswith("not back where it started: 1 sessions") for line in lines), lines
    assert lines[-1] == "FAIL"
