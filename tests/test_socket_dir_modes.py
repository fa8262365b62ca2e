"""The socket's directory (contract, section 4): a directory the daemon creates is 0700, one
that exists keeps its mode, and the socket is 0600 either way, whatever the umask."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from omkd.listen import StartupError, open_unix_listener, prepare_socket_directory
from omkd.server import _activated_config

from rpc_helpers import make_config, running_daemon, short_tempdir


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


@pytest.mark.parametrize(
    ("owner", "dir_mode", "taken"),
    [
        (4242, 0o700, True),  # this user's own
        (0, 0o1777, False),  # /tmp: another user could take the name while it is stopped
        (0, 0o755, False),  # root's
        (4343, 0o700, False),  # another user's: made before the daemon first ran
        (4242, 0o1777, False),  # its own, but every user may write in it (/tmp for root)
        (4242, 0o770, True),  # its own, its group's too (a private group, often)
    ],
)
def test_only_a_socket_directory_of_the_users_own_is_served_in(
    monkeypatch: pytest.MonkeyPatch, owner: int, dir_mode: int, taken: bool
) -> None:
    # As uid 4242 (the tests run as root).
    with short_tempdir() as directory:
        socket_dir = directory / "d"
        socket_dir.mkdir()
        os.chown(socket_dir, owner, -1)
        os.chmod(socket_dir, dir_mode)
        monkeypatch.setattr(os, "getuid", lambda: 4242)
        if taken:
            prepare_socket_directory(socket_dir / "omkd.sock")
        else:
            with pytest.raises(StartupError, match="could take the socket's name"):
                prepare_socket_directory(socket_dir / "omkd.sock")


def test_a_socket_path_near_the_length_limit_listens(shared: Path) -> None:
    # Bound first under a longer temporary name, it failed past ~97 bytes ("None").
    path = shared / ("s" * (106 - len(os.fsencode(shared)) - 1))
    assert len(os.fsencode(path)) == 106
    with contextlib.closing(open_unix_listener(path, 8)) as listener:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            accepted, _ = listener.accept()
            accepted.close()
        assert sorted(p.name for p in shared.iterdir()) == [path.name]


def test_an_abstract_activation_socket_is_reported_by_its_name() -> None:
    name = f"omkd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("\0" + name)
        sock.listen()
        config = _activated_config(make_config(Path("/nonexistent")), sock)
    assert config.socket_path == "@" + name
