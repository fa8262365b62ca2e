"""Logging a run of failures: the first, a line now and then while it lasts, its end."""

from __future__ import annotations

import logging

import pytest

from omkd.failures import FailureLog


def test_a_run_of_failures_is_logged_when_it_begins_now_and_then_and_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("test.failures")
    caplog.set_level(logging.INFO, logger="test.failures")
    quiet = FailureLog(logger, "writes")
    quiet.succeeded()  # nothing to end
    for n in range(5):
        quiet.failed(f"disk full {n}")
    assert [r.getMessage() for r in caplog.records] == ["writes failing: disk full 0"]
    assert caplog.records[0].levelno == logging.ERROR
    quiet.succeeded()
    quiet.succeeded()
    assert (
        caplog.records[-1].getMessage().startswith("writes succeeding again, after 5 failures over")
    )
    assert len(caplog.records) == 2
    caplog.clear()
    chatty = FailureLog(logger, "checkpoints", every=0)  # a line at every failure but the first
    for n in range(3):
        chatty.failed(f"I/O error {n}")
    assert [r.getMessage().split(" in the last")[0] for r in caplog.records] == [
        "checkpoints failing: I/O error 0",
        "checkpoints still failing: 1 more",
        "checkpoints still failing: 1 more",
    ]
    assert caplog.records[-1].getMessage().endswith("the last: I/O error 2")
