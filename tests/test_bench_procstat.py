"""bench/procstat.py: the usage figures of the writer scenarios, from /proc."""

from __future__ import annotations

import math
import os
import time

from bench import procstat


def test_usage_divides_the_differences() -> None:
    server = (procstat.ServerSample(1.0, 0.5), procstat.ServerSample(1.2, 0.8))
    machine = (procstat.MachineSample(100, 10, 1000), procstat.MachineSample(150, 30, 1200))
    used = procstat.usage(server, machine, seconds=2.0, calls=4000)
    assert math.isclose(used.server_cpu_us_per_call, 50.0)  # 0.2 s over 4,000 calls
    assert math.isclose(used.server_runqueue_wait, 0.15)  # 0.3 s of 2 s
    assert math.isclose(used.machine_idle, 0.25)  # 50 of 200 ticks
    assert math.isclose(used.machine_steal, 0.10)


def test_usage_without_a_server_has_only_machine_figures() -> None:
    machine = (procstat.MachineSample(0, 0, 0), procstat.MachineSample(40, 0, 100))
    used = procstat.usage(None, machine, seconds=1.0, calls=10)
    assert math.isnan(used.server_cpu_us_per_call)
    assert math.isnan(used.server_runqueue_wait)
    assert used.machine_idle == 0.4


def test_samples_of_this_process_count_its_cpu_time() -> None:
    before = procstat.sample_server(os.getpid())
    machine_before = procstat.sample_machine()
    end = time.process_time() + 0.1
    while time.process_time() < end:  # 100 ms of CPU: ten clock ticks
        pass
    after = procstat.sample_server(os.getpid())
    machine_after = procstat.sample_machine()
    assert after.cpu_s - before.cpu_s >= 0.05
    assert after.runqueue_wait_s >= before.runqueue_wait_s
    assert machine_after.total_ticks > machine_before.total_ticks
