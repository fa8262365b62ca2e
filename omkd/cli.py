"""``omkd``: the daemon (``serve``) and maintenance without a running daemon.

Every command finds the database as ``serve`` does (``--db``, ``$OMKD_DB``, the XDG default)
and on failure prints one readable line to stderr and exits non-zero: 1, or 78 when
``serve`` refuses to start (nothing changes by starting it again until someone acts).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

import omkd
from omkd import db
from omkd.config import ConfigError, load_config, resolve_db_path
from omkd.listen import FileLock, StartupError, hold_lock

__all__ = ["main"]

EXIT_FAILURE = 1
EXIT_USAGE = 2
# serve refused to start (a damaged or newer database, another daemon, a path or setting it
# cannot use): starting again changes nothing until someone acts. sysexits' EX_CONFIG; the
# systemd unit's RestartPreventExitStatus. A failure that may pass (out of descriptors, a
# full disk, the database busy for a moment) exits 1, which systemd retries.
EXIT_REFUSED = 78

_EXAMPLES = """\
examples:
  omkd serve                                 # socket and database at their XDG defaults
  omkd serve --socket ~/omk/omkd.sock --db ./omk.db --lock-timeout 10
  omkd migrate --db ~/.local/state/omk/omk.db
  omkd backup /var/backups/omk-$(date +%F).db
  omkd check
  omkd install-units && systemctl --user enable --now omkd.socket

exit codes: 0 ok, 1 failed (serve: a start that may succeed later), 2 usage,
78 serve refused to start (a damaged database, another daemon, a path or setting it
cannot use: it will not start until someone acts)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omkd",
        description="omkd: the local state daemon for omk agents.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"omkd {omkd.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the daemon",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--socket",
        help="Unix socket path (default: $OMKD_SOCKET, else socket_path in --config, "
        "else $XDG_RUNTIME_DIR/omk/omkd.sock, else /tmp/omk-UID/omkd.sock)",
    )
    _db_flag(serve, from_config=True)
    serve.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file with any Config field (docs/PROTOCOL.md); flags and "
        "$OMKD_SOCKET/$OMKD_DB win over it",
    )
    serve.add_argument(
        "--lock-timeout",
        type=float,
        metavar="S",
        help="seconds a writer waits for another's transaction (default 5)",
    )
    serve.add_argument(
        "--tx-idle-timeout",
        type=float,
        metavar="S",
        help="seconds an idle transaction lives (default 60)",
    )
    serve.add_argument(
        "--max-message-bytes",
        type=int,
        metavar="N",
        help="largest message accepted (default 16 MiB)",
    )
    serve.add_argument(
        "--synchronous",
        choices=["NORMAL", "FULL"],
        help="SQLite durability: FULL also survives power loss (default NORMAL)",
    )
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    migrate = commands.add_parser("migrate", help="apply pending schema migrations")
    _db_flag(migrate)
    backup = commands.add_parser(
        "backup", help="write a consistent copy of the database, as it is (never migrated)"
    )
    backup.add_argument("dest", help="path of the copy (replaced if it exists)")
    _db_flag(backup)
    check = commands.add_parser("check", help="integrity and foreign-key check")
    _db_flag(check)
    units = commands.add_parser("install-units", help="install the systemd user units")
    units.add_argument(
        "--user",
        action="store_true",
        default=True,
        help="install for the current user (the only mode; default)",
    )
    units.add_argument(
        "--dest",
        type=Path,
        help="directory (default $XDG_CONFIG_HOME/systemd/user, else ~/.config/systemd/user)",
    )
    _db_flag(units)
    return parser


def _db_flag(parser: argparse.ArgumentParser, *, from_config: bool = False) -> None:
    config = "else db_path in --config, " if from_config else ""
    parser.add_argument(
        "--db",
        help=f"database path (default: $OMKD_DB, {config}"
        "else $XDG_STATE_HOME/omk/omk.db, else ~/.local/state/omk/omk.db)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(_COMMANDS[args.command](args))
    except (StartupError, ConfigError, db.DbError, OSError) as exc:
        print(f"omkd {args.command}: {exc}", file=sys.stderr)
        lasting = isinstance(exc, ConfigError) or getattr(exc, "lasting", False)
        return EXIT_REFUSED if args.command == "serve" and lasting else EXIT_FAILURE


def _serve(args: argparse.Namespace) -> int:
    config = load_config(
        args.config,
        {
            "socket_path": args.socket,
            "db_path": args.db,
            "lock_timeout": args.lock_timeout,
            "tx_idle_timeout": args.tx_idle_timeout,
            "max_message_bytes": args.max_message_bytes,
            "synchronous": args.synchronous,
            "log_level": args.log_level,
        },
    )
    logging.basicConfig(
        level=config.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from omkd.server import serve

    return trio.run(serve, config)


def _migrate(args: argparse.Namespace) -> int:
    path = resolve_db_path(args.db)
    with hold_lock(path, "database"), contextlib.closing(FileLock(path)) as file_lock:
        file_lock.take()  # not while a daemon serves it under another name either
        applied = db.migrate(path)
    if applied:
        for name in applied:
            print(f"applied {name}")
    else:
        print(f"{path}: schema is up to date")
    return 0


def _backup(args: argparse.Namespace) -> int:
    path = resolve_db_path(args.db)
    if not path.exists():
        raise StartupError(f"no database at {path}")
    dest = Path(args.dest).expanduser().absolute()  # relative to where it is run, as cp
    size = db.backup_database(path, dest)  # as the file is: never migrated
    # A copy is as sound as its source: one that fails the check is no backup to rely on.
    problems = db.check_database(dest)
    if problems:
        print(f"wrote {dest} ({size} bytes), but the copy fails the integrity check: "
              f"{'; '.join(problems[:3])}", file=sys.stderr)  # fmt: skip
        print(f"the database itself is damaged (omkd check --db {path}); keep a good "
              f"backup you have, and this copy only as a last resort", file=sys.stderr)  # fmt: skip
        return EXIT_FAILURE
    print(f"wrote {dest} ({size} bytes), checked")
    return 0


def _check(args: argparse.Namespace) -> int:
    path = resolve_db_path(args.db)
    if not path.exists():
        raise StartupError(f"no database at {path}")
    problems = db.check_database(path)
    if problems:
        print(f"{path}: {len(problems)} problem(s) found:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        print("restore the database from a backup (omkd backup writes one)", file=sys.stderr)
        return EXIT_FAILURE
    try:  # sound as a SQLite file; and as omkd's?
        pending = db.pending_migrations(path)
    except (db.SchemaTooNew, db.MigrationMismatch) as exc:
        print(f"{path}: sound, but not usable by this omkd {omkd.__version__}: {exc}",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILURE
    if len(pending) == len(db.load_migrations()):
        print(f"{path}: ok, but it holds no omkd schema yet (omkd migrate, or the daemon's "
              f"start, creates it)")  # fmt: skip
    elif pending:
        names = ", ".join(m.path.name for m in pending)
        print(f"{path}: ok; migrations to apply (omkd migrate, or the daemon's start): {names}")
    else:
        print(f"{path}: ok")
    return 0


def _install_units(args: argparse.Namespace) -> int:
    from omkd import units

    # The database serve would use here, pinned in ExecStart: the service sees no $OMKD_DB.
    db_path = resolve_db_path(args.db)
    try:
        written_units = units.install_units(args.dest, db_path=db_path)
    except ValueError as exc:  # a path a unit file cannot name, or the service cannot see
        print(f"omkd install-units: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    warning = units.private_tmp_warning(db_path)
    if warning is not None:
        print(warning, file=sys.stderr)
    for written in written_units:
        print(f"wrote {written}")
    print(units.enable_instructions())
    return 0


_COMMANDS = {
    "serve": _serve,
    "migrate": _migrate,
    "backup": _backup,
    "check": _check,
    "install-units": _install_units,
}
