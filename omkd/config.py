"""The daemon's configuration: flags, then the environment, then a TOML file, then defaults.

Each setting comes from the first of these that gives it:

1. a command-line flag (``--socket``, ``--db``, ``--lock-timeout``, ...);
2. the environment: ``$OMKD_SOCKET`` and ``$OMKD_DB``, the only settings that have a
   variable (empty counts as unset);
3. the ``--config`` TOML file;
4. the defaults: the XDG paths of contract section 4, and the field defaults below.

The environment beats the file because it is the more specific, per-invocation choice (a
unit's ``Environment=``, a shell's ``OMKD_DB=... omkd serve``), while the file is shared
and long-lived; and because ``omkctl`` finds the socket through ``$OMKD_SOCKET`` too, so a
daemon started with the same environment listens where its clients look.

Every timeout and limit the daemon applies lives here with its default; nothing in the logic
is a bare number.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from omkd_client.paths import default_socket_path

__all__ = ["Config", "ConfigError", "canonical_db_path", "default_db_path", "load_config"]

MiB = 1024 * 1024

# The settings that an environment variable may give (between the flags and the file).
ENV_VARS = {"socket_path": "OMKD_SOCKET", "db_path": "OMKD_DB"}


GC_THRESHOLD_MAX: Final = 2**31 - 1
BATCH_SLICE_S: Final = 0.002  # the default of batch_slice (also the Dispatcher's)
LONG_CALL_ROWS: Final = 1000  # the default of long_call_rows (also the Dispatcher's)
LONG_CALL_BYTES: Final = 256 * 1024  # the default of long_call_bytes (also the Dispatcher's)
LONG_CALL_S: Final = 0.01  # the default of long_call_seconds (also the Dispatcher's)
BATCH_REPLY_BYTES: Final = 64 * MiB  # the default of batch_reply_bytes (also the Dispatcher's)
# The default of idle_spin: a client's next request, across two CPUs, comes ~30-60 µs after
# its reply.
IDLE_SPIN_S: Final = 0.0001
# The longest idle_spin accepted: longer, a lone client's every pause would cost that much
# CPU, and timers and worker threads' results would wait as long.
IDLE_SPIN_MAX_S: Final = 0.01


class ConfigError(Exception):
    """The configuration file or a flag is not usable; the message says which and why."""


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    socket_path: str = ""
    db_path: str = ""
    # Seconds a writer waits for another session's transaction before answering busy.
    lock_timeout: float = 5.0
    # Seconds a session's transaction may sit without a call before it is rolled back.
    tx_idle_timeout: float = 60.0
    # Largest message accepted; a longer frame is answered with -32600 and closes.
    max_message_bytes: int = 16 * MiB
    # Seconds a client outside a transaction may take to finish a message it began (counted
    # from its last whole message) before the connection is closed: a half-sent message
    # holds its bytes, up to max_message_bytes, for as long as it waits.
    message_timeout: float = 30.0
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Bytes of replies and notifications queued for one client before it must read.
    outbox_bytes: int = 4 * MiB
    # Seconds a subscriber may leave its outbox full before it is cut off.
    subscriber_stall_timeout: float = 30.0
    # Seconds a client may leave its replies unread (outbox full) before it is disconnected;
    # until then it holds whatever it holds, its transaction and the write lock included.
    reply_stall_timeout: float = 30.0
    # Seconds at most a group commit waits for concurrent single writes to join it (it
    # commits as soon as every connection has been served and waits in the poller, or while
    # one is busy in its own task, once every task that could run has run; at once if no
    # other write came during its first turn of the scheduler); also how close together
    # writes of two sessions must come to count as concurrent. 0: no group commit.
    group_commit_window: float = 0.002
    # Seconds between checks for new writes to checkpoint from the WAL into the database;
    # the checkpoints run in a worker thread, so no commit waits for one.
    checkpoint_interval: float = 0.25
    # WAL pages past which a commit checkpoints by itself (SQLite's wal_autocheckpoint): a
    # backstop for when the worker's checkpoints fall behind. High, because that checkpoint
    # runs on the event loop: during a 500 MB backup one at 10,000 pages stalled writers for
    # ~250 ms. 0: never.
    wal_autocheckpoint: int = 100_000
    # WAL pages past which the background checkpoint, when writes went on during it, runs
    # once more with writes held back (a few ms), so that the WAL starts over from its
    # beginning instead of growing for as long as writes never pause; also the size the WAL
    # file is cut back to when it starts over. 0: never hold writes back for it.
    wal_restart_pages: int = 4096
    # Seconds the daemon keeps looking for a client's next request once it has answered
    # every connection and nothing else has work, yielding the CPU between looks, before it
    # sleeps (only while it serves one client alone, whose last pause was short: see
    # omkd.rpc.poller). A request that comes meanwhile is served at once; one that finds it
    # asleep first wakes a halted CPU (10-35 µs each way on a virtual machine, where a round
    # trip across two CPUs is mostly that). Costs at most this much CPU per idle gap, none while
    # idle. 0: sleep at once; at most IDLE_SPIN_MAX_S.
    idle_spin: float = IDLE_SPIN_S
    # Events fetched per query when feeding a subscription.
    page_size: int = 500
    # Seconds a batch's calls run before the daemon serves the other connections, then goes
    # on with the batch: a batch of 100,000 calls takes seconds, and nobody else must wait
    # for it to end.
    batch_slice: float = BATCH_SLICE_S
    # Bytes of replies a batch may gather: once its replies pass it, its remaining calls are
    # not run, each answered -32600 (a batch's reply is one message, held whole until it is
    # sent: 100 pages of a whole log, a 9 KB request, took 7 GB).
    batch_reply_bytes: int = BATCH_REPLY_BYTES
    # Rows past which a call runs in a worker thread, the event loop serving the other
    # connections meanwhile: a page of more events or goals, a batch of more events or
    # tasks, and every call that reads, deletes or replaces all of a goal's rows, whatever
    # it holds (goal.delete of a goal of 300,000 events takes 1-2 s; a page filtered by
    # `since` may scan the goal's whole log). A call under it runs on the
    # event loop, where it costs less than the thread hop would (~150 µs).
    long_call_rows: int = LONG_CALL_ROWS
    # Bytes of params past which a call runs in a worker thread too, whatever its rows: an
    # event.append_batch of 1,000 events of 15 KB held the event loop 330 ms.
    long_call_bytes: int = LONG_CALL_BYTES
    # Seconds a page or list under long_call_rows may read on the event loop before it is
    # stopped and run again in a worker thread: its rows do not tell its bytes (a page of
    # 1,000 events of 15 KB, 15 MB, took 75 ms). A page of 1,000 small events takes 2-5 ms.
    long_call_seconds: float = LONG_CALL_S
    # Long reads outside a transaction that run at once, each in a thread and on a read
    # connection of its own (long writes take the write lock: one at a time).
    long_reads: int = 4
    # Pending connections the kernel may hold before accept().
    listen_backlog: int = 512
    # Seconds to wait before retrying accept() after running out of file descriptors.
    accept_retry_delay: float = 0.1
    # Python's garbage collector, while the daemon serves: the net count of new container
    # objects that starts a young collection (gc.set_threshold's first value; Python's own
    # is 700). A bulk call holds tens of thousands until it ends (event.append_batch of
    # 10,000 events: 40,000-50,000); at 700, the collections midway move them to older
    # generations, and one such call in three or four then ended in a full collection
    # (~20 ms on top of ~38). Calls leave next to nothing for the collector (no reference
    # cycles), so collecting seldom costs nothing.
    gc_threshold: int = 100_000

    def __post_init__(self) -> None:
        for name in (
            "lock_timeout",
            "tx_idle_timeout",
            "message_timeout",
            "subscriber_stall_timeout",
            "reply_stall_timeout",
            "checkpoint_interval",
            "accept_retry_delay",
        ):
            if not getattr(self, name) > 0:  # (NaN too)
                raise ValueError(f"{name} must be positive")
        for name in (
            "max_message_bytes",
            "outbox_bytes",
            "page_size",
            "gc_threshold",
            "long_reads",
            "listen_backlog",
            "batch_reply_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in (
            "group_commit_window",
            "wal_autocheckpoint",
            "wal_restart_pages",
            "batch_slice",
            "long_call_rows",
            "long_call_bytes",
            "long_call_seconds",
            "idle_spin",
        ):
            if not getattr(self, name) >= 0:  # (NaN too)
                raise ValueError(f"{name} must not be negative")
        if self.idle_spin > IDLE_SPIN_MAX_S:
            raise ValueError(f"idle_spin must be at most {IDLE_SPIN_MAX_S}")
        if self.gc_threshold > GC_THRESHOLD_MAX:  # what gc.set_threshold takes (a C int)
            raise ValueError(f"gc_threshold must be at most {GC_THRESHOLD_MAX}")


def default_db_path(env: Mapping[str, str] | None = None) -> Path:
    """Return ``$XDG_STATE_HOME/omk/omk.db``, else ``~/.local/state/omk/omk.db``."""
    env = os.environ if env is None else env
    state = env.get("XDG_STATE_HOME", "")
    # The XDG spec says to ignore a relative value.
    if os.path.isabs(state):
        base = Path(state)
    else:
        base = Path(env.get("HOME") or Path.home()) / ".local" / "state"
    return base / "omk" / "omk.db"


def resolve_db_path(flag: str | None, env: Mapping[str, str] | None = None) -> Path:
    """Return the database path: the flag, else ``$OMKD_DB``, else the default; canonical."""
    env = os.environ if env is None else env
    if flag:
        return canonical_db_path(flag)
    if env.get("OMKD_DB"):
        return canonical_db_path(env["OMKD_DB"])
    return canonical_db_path(default_db_path(env))


def canonical_db_path(path: str | os.PathLike[str]) -> Path:
    """``path`` absolute, ``~`` expanded and symbolic links resolved, as ``Database.open``
    opens it: one file has one name, so its lock file (``<path>.lock``) is one file too,
    however a second daemon or ``omkd migrate`` is told the path."""
    return Path(path).expanduser().resolve()


def load_config(
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration: ``overrides`` (the flags), then env, then the file, then defaults.

    ``overrides`` values that are None are unset. Raises ConfigError naming the file or field
    at fault.
    """
    env = os.environ if env is None else env
    fields = _read_config_file(config_file) if config_file else {}
    fields.update({name: env[var] for name, var in ENV_VARS.items() if env.get(var)})
    fields.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if not fields.get("socket_path"):
        fields["socket_path"] = str(default_socket_path(env))
    if not fields.get("db_path"):
        fields["db_path"] = str(default_db_path(env))
    try:
        config = msgspec.convert(fields, Config)
    except msgspec.ValidationError as exc:
        where = f" in {config_file}" if config_file else ""
        raise ConfigError(f"invalid configuration{where}: {exc}") from exc
    return msgspec.structs.replace(
        config,
        db_path=str(canonical_db_path(config.db_path)),
        # A config file's "~/..."; absolute, as db_path, so that daemon.status and the log
        # name the socket clients can find from anywhere.
        socket_path=os.path.abspath(os.path.expanduser(config.socket_path)),
    )


def _read_config_file(config_file: str) -> dict[str, Any]:
    try:
        fields = msgspec.toml.decode(Path(config_file).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from exc
    except msgspec.DecodeError as exc:
        raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {config_file} is not UTF-8 text: {exc.reason}") from exc
    return dict(fields)
