"""Where ``omkd serve`` listens and what it opens when given no --socket or --db (contract,
section 4): ``$OMKD_SOCKET`` and ``$OMKD_DB``, else ``$XDG_RUNTIME_DIR/omk/omkd.sock`` and
``$XDG_STATE_HOME/omk/omk.db``. The daemon runs as a real process in an environment built
here, which inherits no OMKD_*, XDG or systemd socket-activation variable.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proc_helpers import DaemonProcess, controlled_env, sync_call
from rpc_helpers import short_tempdir


class FlaglessDaemon(DaemonProcess):
    """``omkd serve`` with no --socket or --db: it must find both through ``env``.

    ``socket_path`` and ``db_path`` are where it is expected to be found (the readiness
    check pings ``socket_path``).
    """

    def __init__(
        self, directory: Path, env: dict[str, str], socket_path: Path, db_path: Path
    ) -> None:
        super().__init__(directory, socket_path=socket_path, db_path=db_path)
        self.env = env

    def command(self) -> list[str]:
        return [sys.executable, "-m", "omkd", "serve"]


def serve_status_then_sigterm(daemon: FlaglessDaemon) -> dict[str, Any]:
    """Start the daemon, return its daemon.status, stop it with SIGTERM expecting exit 0."""
    try:
        daemon.start()
        status: dict[str, Any] = sync_call(daemon.socket_path, "daemon.status")["result"]
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0, daemon.log()
        return status
    finally:
        daemon.stop()


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_tempdir() as directory:
        yield directory


def test_serve_uses_omkd_socket_and_omkd_db(workdir: Path) -> None:
    socket_path, db_path = workdir / "env.sock", workdir / "env-db" / "omk.db"
    run, state = workdir / "run", workdir / "state"
    env = controlled_env(
        workdir / "home",
        OMKD_SOCKET=socket_path,
        OMKD_DB=db_path,
        XDG_RUNTIME_DIR=run,  # the defaults are set too: the variables win over them
        XDG_STATE_HOME=state,
    )
    status = serve_status_then_sigterm(FlaglessDaemon(workdir, env, socket_path, db_path))
    assert status["socket_path"] == str(socket_path)
    assert status["db_path"] == str(db_path.resolve())
    assert db_path.is_file()
    assert not run.exists() and not state.exists()


def test_serve_uses_the_xdg_defaults(workdir: Path) -> None:
    run, state = workdir / "run", workdir / "state"
    run.mkdir(mode=0o700)
    state.mkdir()
    socket_path, db_path = run / "omk" / "omkd.sock", state / "omk" / "omk.db"
    env = controlled_env(workdir / "home", XDG_RUNTIME_DIR=run, XDG_STATE_HOME=state)
    status = serve_status_then_sigterm(FlaglessDaemon(workdir, env, socket_path, db_path))
    assert status["socket_path"] == str(socket_path)
    assert status["db_path"] == str(db_path.resolve())
    assert db_path.is_file()
    assert stat.S_IMODE(os.stat(socket_path.parent).st_mode) == 0o700
    assert not (workdir / "home").exists()
