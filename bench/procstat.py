"""Where the CPU time went during a measurement, from Linux's /proc: a server's own CPU per
call, the time its main thread spent runnable but waiting for a CPU, and the machine's idle
and stolen shares.

Why: under the writer scenarios the daemon's throughput is bounded by its one thread, and
the figures swing between runs with the machine more than with the code. These say which:
a run where the server waited for a CPU while the machine idled is the scheduler's doing
(the clients its replies wake are placed on its CPU and run first), and a high steal share
is the host's (a shared VM's vCPUs not running at all).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

_TICKS_PER_S: Final = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ServerSample:
    cpu_s: float  # user + system, all threads
    runqueue_wait_s: float  # the main thread, runnable and not running


@dataclass(frozen=True)
class MachineSample:
    idle_ticks: int  # idle and iowait, all CPUs
    steal_ticks: int
    total_ticks: int


@dataclass(frozen=True)
class Usage:
    """What a measurement of ``seconds`` cost: per call and as shares of the time."""

    server_cpu_us_per_call: float
    server_runqueue_wait: float  # share of the wall time
    machine_idle: float  # share of every CPU's time
    machine_steal: float


def sample_server(pid: int) -> ServerSample:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    schedstat = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    return ServerSample((utime + stime) / _TICKS_PER_S, int(schedstat[1]) / 1e9)


def sample_machine() -> MachineSample:
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest and guest_nice are in user)
    return MachineSample(values[3] + values[4], values[7], sum(values[:8]))


def usage(
    server: tuple[ServerSample, ServerSample] | None,
    machine: tuple[MachineSample, MachineSample],
    seconds: float,
    calls: int,
) -> Usage:
    """The usage between two pairs of samples; server figures NaN without a server."""
    nan = float("nan")
    if server is None or calls <= 0 or seconds <= 0:
        cpu, wait = nan, nan
    else:
        before, after = server
        cpu = (after.cpu_s - before.cpu_s) / calls * 1e6
        wait = (after.runqueue_wait_s - before.runqueue_wait_s) / seconds
    first, last = machine
    total = last.total_ticks - first.total_ticks
    if total <= 0:
        return Usage(cpu, wait, nan, nan)
    return Usage(
        cpu,
        wait,
        (last.idle_ticks - first.idle_ticks) / total,
        (last.steal_ticks - first.steal_ticks) / total,
    )
