"""The poller: one task that answers the connections whose requests will not wait.

Theory of operation. A connection with nothing in progress (no transaction, no reply held,
no whole message buffered) parks here instead of waiting on its own socket. The poller keeps
the parked sockets in an epoll set of its own, registered once while they stay parked, and
trio waits on that one descriptor. When it is ready, the poller asks each ready connection
to ``serve_ready``: read what is there and answer what ``Dispatcher.answer_now`` answers
(reads, writes that join a group commit or go alone, daemon.ping), all inline; then it looks
again, and serves what became ready meanwhile, up to ``passes_per_wakeup`` times while the
wake-up has lasted less than ``wakeup_budget``. A connection whose input needs more than
that (a transaction, a batch, an error of the envelope, the end of the stream, a reply that
finds the socket busy) is handed back to its own task, which goes on where the poller
stopped. Once a wake-up has served every connection that was ready, it calls
``on_drained`` (the daemon commits an open group commit there when every connection is
parked: no write can join it before a client sends again). Then, if it has served one
connection alone since it last slept, that client's last pause was short, ``on_drained``
says every connection is parked, and no other task is ready to run, it keeps looking for up
to ``idle_spin`` seconds (yielding the CPU between looks) before it goes back to trio: the
client's next request is then served without waking a halted CPU. It serves what a spin
caught, then lets the other tasks run before it spins again; a spin that lost its CPU to
another process ends the spinning for ``spin_backoff``.

Why: a task woken for each request costs a trip through trio's scheduler (the socket
re-armed in trio's epoll set, the task rescheduled, its coroutines resumed); here one
wake-up of the poller serves every connection that is ready, and a parked socket is not
re-armed between its requests. Under 8 writers: 72.6k -> 64.3k instructions an append;
looking again before going back to trio, 16,000 -> 17,500 appends a second. A round trip
across two CPUs is mostly two wake-ups of a halted CPU (these virtual machines halt an idle
one at once, and waking it costs 10-35 µs); looking on for a moment after the last reply
catches the client's next request while the CPU is still awake: a two-CPU ping ~100 ->
~40 µs (bench/README.md has the figures).

Resource handling: a parked connection is in the epoll set exactly while it is parked; it
leaves it when handed back, and when its task is cancelled (the connection ends or the daemon
stops). Error handling: ``serve_ready`` never raises; the poller ends only when cancelled.
"""

from __future__ import annotations

import os
import resource
import select
import time
from collections.abc import Callable
from typing import Final, Protocol, TypeVar

import trio

__all__ = ["PASSES_PER_WAKEUP", "WAKEUP_BUDGET_S", "Parked", "Poller", "SpinOdds"]

T = TypeVar("T")


def _involuntary_switches() -> int:
    """How many times the kernel has switched this thread out for another task."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw


class Parked(Protocol):
    fd: int

    def serve_ready(self) -> bool:
        """Answer what the socket's input allows inline; False to be handed back to the
        connection's task (the connection keeps what it read). Never raises."""
        ...


# After serving what was ready, the poller looks again before going back to trio: under 8
# writers two times in three more was ready already (their clients answered while the others
# were served), and each look saves a trip through trio's scheduler. Bounded, so that other
# tasks (and trio's own look at their sockets) get their turn: in passes (2, 8 and 16
# measured the same as 4), and in time, for clients that pipeline long runs of requests (a
# pass may answer 64 KiB of them from each connection).
PASSES_PER_WAKEUP: Final = 4
# The poller spins for a lone client whose last pause, as the poller saw it from asleep, was
# shorter than this many times idle_spin: seen from asleep, a pause includes the wake-ups
# (10-35 µs each here) that the spin saves. (A client pausing 50 µs between pings: 115 ->
# 43 µs a ping with a factor of 2; with 1, the poller never spun for it.)
SPIN_PAUSE_FACTOR: Final = 2
# Seconds the poller does not spin after a spin lost its CPU to another process: a spinning
# daemon is runnable, so a request that comes meanwhile does not preempt the other process
# as it would wake a sleeping daemon, and waits out its time slice (with a busy process on
# the daemon's CPU and the client on another: pings of ~4 ms instead of ~60 µs).
SPIN_BACKOFF_S: Final = 1.0
# A look of the spin (a yield and a poll, ~1 µs) that took longer than this while the kernel
# switched the poller's thread out for another task: another process had the CPU (its time
# slice here: ~4 ms). Not the guest's own hiccups (20-150 µs, seen while spinning on an idle
# machine: no switch), nor a wait for the GIL (a voluntary switch).
SPIN_LOST_CPU_S: Final = 0.001
# After a spin that caught nothing, the next 2, 4, ... up to 2**MAX_MISS_SHIFT chances to
# spin for that client are let go (a spin that catches a request starts over): a client
# pausing just longer than idle_spin (100-170 µs) looks quick from asleep, and cost a vain
# spin a call (the daemon's CPU per ping 45 -> 120-155 µs).
MAX_MISS_SHIFT: Final = 6
# The poller's partner (below) before it has served anyone, and once it has served several.
NOBODY: Final = -1
SEVERAL: Final = -2
WAKEUP_BUDGET_S: Final = 0.001  # no further pass once a wake-up has served this long


class SpinOdds:
    """Whether spinning for one client's next request is likely to pay: its last pause
    was short (``pays``, set by the caller from the pause it saw), and no spin for it
    caught nothing lately (then the next chances are let go, more after each miss)."""

    __slots__ = ("_misses", "_skips", "pays")

    def __init__(self) -> None:
        self.pays = False
        self._misses = 0
        self._skips = 0  # chances to spin still to let go

    def take(self) -> bool:
        """Whether to spin now (a chance let go counts)."""
        if not self.pays:
            return False
        if self._skips:
            self._skips -= 1
            return False
        return True

    def caught(self) -> None:
        self._misses = 0

    def missed(self) -> None:
        self.pays = False
        self._misses = min(self._misses + 1, MAX_MISS_SHIFT)
        self._skips = 1 << self._misses


class Poller:
    def __init__(
        self,
        passes_per_wakeup: int = PASSES_PER_WAKEUP,
        wakeup_budget: float = WAKEUP_BUDGET_S,
        idle_spin: float = 0.0,
        spin_backoff: float = SPIN_BACKOFF_S,
    ) -> None:
        self.passes_per_wakeup = passes_per_wakeup
        self.wakeup_budget = wakeup_budget
        self.idle_spin = idle_spin
        self.spin_backoff = spin_backoff
        # For tests and benchmarks: times trio woke the poller once nothing was ready, and
        # rounds of serving (each between two turns of trio's scheduler).
        self.wakeups = 0
        self.rounds = 0
        self.spins = 0  # times it kept looking once nothing was ready
        self.spins_served = 0  # of those, times a request came meanwhile
        self.spins_preempted = 0  # times a spin lost its CPU (then no spin for spin_backoff)
        self.task_spins = 0  # of the spins, those for a connection's own task (spin_for)
        self.task_spins_served = 0
        self._epoll = select.epoll()
        self._parked: dict[int, tuple[Parked, trio.lowlevel.Task]] = {}
        self._resumed: trio.Event | None = None  # set by the task handed back, once it runs
        self._serving = False  # between a wake-up and the last ready connection served
        # The one connection served since the poller last slept, if only one was: the spin
        # waits only for a lone client's next request. With several, it would keep a CPU
        # busy that their processes could use: the scheduler moves no task to a CPU that
        # looks busy (8 writers on 2 CPUs made 8-15% fewer calls a second).
        self._partner = NOBODY
        # Whether a spin would likely catch the partner's next request: the last time
        # nothing was ready, its next request came soon (SPIN_PAUSE_FACTOR), or a spin
        # caught it. A client that pauses longer costs no spin after the first (pausing
        # 1 ms between pings, each ping otherwise cost the daemon 100 µs more CPU).
        self._odds = SpinOdds()
        self._idle_since = 0.0  # when nothing was ready last (perf_counter)
        self._no_spin_until = 0.0  # (perf_counter) after a spin lost its CPU
        # Called once a wake-up has served every connection that was ready; it must not
        # block or raise. True: every connection is parked here, so looking on for
        # idle_spin keeps no connection's own task waiting.
        self.on_drained: Callable[[], bool] = lambda: True

    async def turn(self) -> None:
        """Shielded: one turn of the scheduler, and more until the poller has served every
        connection that is ready. A group commit's leader waits this long to see whether
        other writes join it."""
        await trio.lowlevel.cancel_shielded_checkpoint()
        while self._serving:
            await trio.lowlevel.cancel_shielded_checkpoint()

    def close(self) -> None:
        self._epoll.close()

    async def run(self) -> None:
        """Serve the parked connections until cancelled."""
        fd = self._epoll.fileno()
        await trio.lowlevel.wait_readable(fd)
        self.wakeups += 1
        while True:
            self.rounds += 1
            self._serving = True
            try:
                more = await self._serve_round()
            finally:
                self._serving = False
            if more:  # the other tasks' turn, then look again
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.wait_readable(fd)
                self.wakeups += 1
                self._partner = NOBODY
                self._odds.pays = self.quick(time.perf_counter() - self._idle_since)

    async def _serve_round(self) -> bool:
        """Serve what is ready, and look again, up to ``passes_per_wakeup`` times within
        ``wakeup_budget``; once nothing is ready, spin if allowed. True: it stopped at its
        bounds, with more perhaps ready, or after serving what a spin caught; False:
        nothing was ready."""
        poll = self._epoll.poll
        until = time.perf_counter() + self.wakeup_budget
        for _ in range(self.passes_per_wakeup):
            ready = poll(0)
            spun = False
            if not ready:
                self._idle_since = time.perf_counter()
                drained = self.on_drained()  # (always: it commits an open batch)
                if not (drained and self._partner != SEVERAL and self._odds.take()):
                    return False
                ready = self._spin()
                if not ready:
                    return False
                spun = True
            partner = self._partner
            if partner != SEVERAL:
                for fd, _ in ready:
                    if fd != partner:
                        partner = fd if partner == NOBODY else SEVERAL
                self._partner = partner
            await self._serve(ready)
            # After a spin, the other tasks' turn before the next: a task woken together
            # with the poller is in no run queue (trio runs a batch of ready tasks in
            # either order), so the spin's check missed it; it has waited one spin at most.
            if spun or time.perf_counter() > until:
                return True
        return True

    def quick(self, pause: float) -> bool:
        """Whether a client's pause, seen from asleep, was short enough that a spin would
        have caught what came after it (SPIN_PAUSE_FACTOR)."""
        return pause < SPIN_PAUSE_FACTOR * self.idle_spin

    def _spin(self) -> list[tuple[int, int]]:
        """Look for ready connections for up to ``idle_spin`` seconds; none if the spin did
        not run or ran out."""
        poll = self._epoll.poll
        spins = self.spins
        ready = self._spin_until(lambda: poll(0) or None)
        if ready:
            self._odds.caught()
        elif self.spins != spins:
            self._odds.missed()
        return ready or []

    def spin_for(self, fd: int, readable: select.poll) -> bool | None:
        """For a connection served by its own task (a transaction's next call), alone: spin
        until ``readable`` (a poll of its socket ``fd``) reports input. True: it did; False:
        the spin ran out; None: no spin (see ``_spin_until``), the poller has served another
        connection lately (its client may be about to send), or one became ready (the
        poller serves it). The caller checks that every other connection is parked."""
        if self._partner not in (NOBODY, fd) and self.quick(time.perf_counter() - self._idle_since):
            return None
        epoll = self._epoll

        def look() -> bool | None:
            if epoll.poll(0):  # first: a connection that calls again and again must not
                return False  # keep a parked one waiting
            return True if readable.poll(0) else None

        spins = self.spins
        found = self._spin_until(look)
        if self.spins == spins:
            return None  # no spin
        self.task_spins += 1
        self.task_spins_served += found is True
        return None if found is False else found is True

    def _spin_until(self, look: Callable[[], T | None]) -> T | None:
        """Call ``look`` until it returns something, yielding the CPU before each call (a
        client woken on this CPU runs then), for up to ``idle_spin`` seconds; None if it
        never did, if another task is ready to run (it would wait meanwhile), or if a
        spin lost its CPU lately (then None at once)."""
        clock = time.perf_counter
        now = clock()
        if now < self._no_spin_until or trio.lowlevel.current_statistics().tasks_runnable:
            return None
        self.spins += 1
        until = now + self.idle_spin
        switches = _involuntary_switches()
        while now < until:
            os.sched_yield()
            found = look()
            before, now = now, clock()
            if now - before > SPIN_LOST_CPU_S and _involuntary_switches() > switches:
                self.spins_preempted += 1
                self._no_spin_until = now + self.spin_backoff
                return found
            if found is not None:
                self.spins_served += bool(found)
                return found
        return None

    async def _serve(self, ready_fds: list[tuple[int, int]]) -> None:
        for ready, _ in ready_fds:
            parked = self._parked.get(ready)
            if parked is not None and not parked[0].serve_ready():
                # Its task runs a step before the others are served: a write that leads
                # a group commit opens the batch they then join, instead of each one
                # leading a batch of its own. (A checkpoint would not do: trio runs the
                # tasks ready together in either order.)
                resumed = self._resumed = trio.Event()
                self._hand_back(ready)
                await resumed.wait()

    async def park(self, connection: Parked) -> None:
        """Wait until the poller hands ``connection`` back to its task."""
        fd = connection.fd
        self._epoll.register(fd, select.EPOLLIN)
        self._parked[fd] = (connection, trio.lowlevel.current_task())

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            self._forget(fd)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        # Handed back: the poller goes on once this task's step is done.
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.set()

    @property
    def parked(self) -> int:
        """How many connections are parked here now."""
        return len(self._parked)

    def _hand_back(self, fd: int) -> None:
        task = self._forget(fd)
        trio.lowlevel.reschedule(task)

    def _forget(self, fd: int) -> trio.lowlevel.Task:
        _, task = self._parked.pop(fd)
        if not self._epoll.closed:  # (closed: the daemon is stopping)
            self._epoll.unregister(fd)
        return task
