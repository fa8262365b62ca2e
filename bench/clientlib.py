"""The bundled client (``omkd_client.Client``), when it is installed: None otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def client_available() -> bool:
    try:
        from omkd_client import Client  # noqa: F401
    except ImportError:
        return False
    return True


def open_client(socket_path: str | Path) -> Any:
    """A connected ``omkd_client.Client`` with a call timeout fit for large batches."""
    from omkd_client import Client

    return Client.connect(socket_path, call_timeout=600.0)
