"""Logging a run of failures of one kind: the first when it comes, then a line now and then,
and the run's end.

A full disk fails every write, and the background checkpoint every quarter of a second: a
line for each says nothing more than the first, and buries the rest of the log. An operator
needs to know when it began, that it goes on, and when it cleared.
"""

from __future__ import annotations

import logging
import time
from typing import Final

__all__ = ["REPEAT_EVERY_S", "FailureLog"]

REPEAT_EVERY_S: Final = 60.0  # a run that lasts gets one line this often, with its count


class FailureLog:
    """The run of failures of ``what`` (``"writes"``), logged to ``logger``."""

    def __init__(self, logger: logging.Logger, what: str, every: float = REPEAT_EVERY_S) -> None:
        self.failing = False  # a run is on: callers skip succeeded() while it is not
        self._logger = logger
        self._what = what
        self._every = every
        self._count = 0  # failures in the run
        self._unlogged = 0  # failures since the last line
        self._began = 0.0
        self._logged = 0.0

    def failed(self, detail: str) -> None:
        now = time.monotonic()
        if not self.failing:
            self.failing = True
            self._count, self._unlogged, self._began, self._logged = 1, 0, now, now
            self._logger.error("%s failing: %s", self._what, detail)
            return
        self._count += 1
        self._unlogged += 1
        if now - self._logged >= self._every:
            self._logger.error(
                "%s still failing: %d more in the last %.0f s; the last: %s",
                self._what,
                self._unlogged,
                now - self._logged,
                detail,
            )
            self._unlogged, self._logged = 0, now

    def succeeded(self) -> None:
        if not self.failing:
            return
        self.failing = False
        self._logger.warning(
            "%s succeeding again, after %d failures over %.1f s",
            self._what,
            self._count,
            time.monotonic() - self._began,
        )
