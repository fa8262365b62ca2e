"""daemon.status's keys (contract, section 3), and daemon.* in an aborted session (section 5)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from importlib.metadata import version
from typing import Any

import pytest
import trio

import omkd
from omkd.db import load_migrations
from omkd.server import Daemon
from omkd_client.codes import ErrorCode

from rpc_helpers import RawClient, goal, running_daemon, short_tempdir

STATUS_KEYS = {
    "version",
    "schema_version",
    "db_path",
    "socket_path",
    "pid",
    "uptime_s",
    "sessions",
    "active_transactions",
}
IDLE_TIMEOUT = 0.2


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    with short_tempdir() as directory:
        async with running_daemon(directory, tx_idle_timeout=IDLE_TIMEOUT) as d:
            yield d


@pytest.fixture
async def clients(daemon: Daemon) -> AsyncIterator[tuple[RawClient, RawClient]]:
    a = await RawClient.connect(daemon.config.socket_path)
    b = await RawClient.connect(daemon.config.socket_path)
    yield a, b
    await a.aclose()
    await b.aclose()


def assert_status(status: dict[str, Any], daemon: Daemon) -> None:
    assert set(status) >= STATUS_KEYS
    # The version the package declares, which is also the installed distribution's.
    assert status["version"] == omkd.__version__ == version("omkd")
    assert status["schema_version"] == load_migrations()[-1].version
    assert status["db_path"] == daemon.config.db_path
    assert status["socket_path"] == daemon.config.socket_path
    assert status["pid"] == os.getpid()  # the daemon runs in this test's process
    assert isinstance(status["uptime_s"], int | float) and status["uptime_s"] >= 0


async def test_status_includes_the_version(
    daemon: Daemon, clients: tuple[RawClient, RawClient]
) -> None:
    a, _ = clients
    status = await a.call("daemon.status")
    assert_status(status, daemon)
    assert (status["sessions"], status["active_transactions"]) == (2, 0)


async def test_daemon_methods_answer_in_an_aborted_session(
    daemon: Daemon, clients: tuple[RawClient, RawClient]
) -> None:
    a, b = clients
    await a.call("tx.begin")
    await a.call("goal.create", **goal("g1"))
    # Wait for the idle rollback, watching from the other session (which resets no timer).
    with trio.fail_after(5):
        while (await b.call("daemon.status"))["active_transactions"]:
            await trio.sleep(IDLE_TIMEOUT / 10)

    assert (await a.error("goal.get", goal_id="g1"))["code"] == ErrorCode.TRANSACTION_ABORTED
    assert await a.call("daemon.ping") == "pong"
    status = await a.call("daemon.status")
    assert_status(status, daemon)
    assert (status["sessions"], status["active_transactions"]) == (2, 0)
    # Answering daemon.* neither ended the aborted state nor depended on it ending.
    assert (await a.error("goal.get", goal_id="g1"))["code"] == ErrorCode.TRANSACTION_ABORTED
    assert await a.call("tx.rollback") == {"rolled_back": True}
    assert await a.call("goal.get", goal_id="g1") is None  # the idle transaction's write is gone
