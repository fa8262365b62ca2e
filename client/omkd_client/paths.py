"""Where omkd's socket is: the one rule the daemon and its clients share (contract, section 4)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["default_socket_path", "resolve_socket_path", "socket_address"]


def default_socket_path(env: Mapping[str, str] | None = None) -> Path:
    """Return ``$XDG_RUNTIME_DIR/omk/omkd.sock``, else ``/tmp/omk-<uid>/omkd.sock``."""
    env = os.environ if env is None else env
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):  # the XDG spec says to ignore a relative value
        return Path(runtime) / "omk" / "omkd.sock"
    return Path(f"/tmp/omk-{os.getuid()}") / "omkd.sock"


def socket_address(path: str | os.PathLike[str]) -> str:
    """The address to connect to for ``path``: ``@name`` is the abstract socket ``name``
    (as the daemon reports a systemd socket bound there), anything else a file."""
    text = os.fspath(path)
    return "\0" + text[1:] if text.startswith("@") else text


def resolve_socket_path(
    flag: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Path:
    """Return the socket path: the flag, else ``$OMKD_SOCKET``, else the default; a leading
    ``~`` is the home directory, as the daemon takes it."""
    env = os.environ if env is None else env
    if flag:
        return Path(flag).expanduser()
    if env.get("OMKD_SOCKET"):
        return Path(env["OMKD_SOCKET"]).expanduser()
    return default_socket_path(env)
