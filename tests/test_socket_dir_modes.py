"""The socket's directory (contract, section 4): a directory the daemon creates is 0700, one
that exists keeps its mode, and the socket is 0600 either way, whatever the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from rpc_helpers import running_daemon, short_tempdir


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o000], ids=["umask022", "umask000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """A umask under which mkdir and bind alone would give group/other access."""
    previous = os.umask(request.param)
    try:
        yield int(request.param)
    finally:
        os.umask(previous)


@pytest.fixture
def shared() -> Iterator[Path]:
    """An existing directory of mode 0755 (under a short path)."""
    with short_tempdir() as directory:
        path = directory / "shared"
        path.mkdir()
        os.chmod(path, 0o755)
        yield path


async def test_missing_directory_is_created_0700(umask: int, shared: Path) -> None:
    socket_dir = shared / "omk"
    socket_path = socket_dir / "omkd.sock"
    async with running_daemon(shared, socket_path=str(socket_path)):
        assert mode(socket_dir) == 0o700
        assert stat.S_ISSOCK(os.stat(socket_path).st_mode) and mode(socket_path) == 0o600
        assert mode(shared) == 0o755  # its existing parent is left alone


@pytest.mark.parametrize("existing_mode", [0o755, 0o750])
async def test_existing_directory_keeps_its_mode(
    umask: int, shared: Path, existing_mode: int
) -> None:
    os.chmod(shared, existing_mode)
    socket_path = shared / "omkd.sock"
    async with running_daemon(shared, socket_path=str(socket_path)):
        assert mode(shared) == existing_mode
        assert stat.S_ISSOCK(os.stat(socket_path).st_mode) and mode(socket_path) == 0o600
    assert mode(shared) == existing_mode
