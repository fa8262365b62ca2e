"""``omkctl``: the command line of omkd's bundled client, for people and scripts.

Human output is aligned tables (tabulate) and readable times; ``--json`` prints JSON (one
document, or one object per line for event streams). Errors are one line on stderr and an
exit code that says whose fault it was: see the ``EXIT_*`` constants.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

import msgspec
from tabulate import tabulate  # type: ignore[import-untyped]

from omkd_client.errors import (
    ConnectionLost,
    DaemonError,
    DaemonNotRunning,
    OmkdError,
    SubscriptionClosed,
)
from omkd_client.protocol import DEFAULT_CALL_TIMEOUT, DEFAULT_CONNECT_TIMEOUT
from omkd_client.records import EventRecord
from omkd_client.sync_client import Client

__all__ = ["main"]

EXIT_OK: Final = 0
EXIT_DAEMON_ERROR: Final = 1  # the daemon refused the call (not found, conflict, ...)
EXIT_USAGE: Final = 2  # bad arguments (argparse's own code)
EXIT_NOT_RUNNING: Final = 3  # nothing answers on the socket
EXIT_CONNECTION: Final = 4  # the connection broke, a call timed out, a reply was unusable
EXIT_INTERRUPTED: Final = 130  # Ctrl-C, as shells report SIGINT

DEFAULT_TAIL: Final = 20  # events shown by `events tail` without --limit or --after
TEXT_WIDTH: Final = 50  # characters of goal text shown in a table cell
PAYLOAD_WIDTH: Final = 100  # characters of an event payload shown on a human line

_EXAMPLES: Final = {
    "omkctl": """\
examples:
  omkctl status
  omkctl goal list --status running
  omkctl goal show g-42 --json
  omkctl events tail g-42 --follow
  omkctl call goal.get '{"goal_id": "g-42"}'
  echo '{"goal_id": "g-42"}' | omkctl call goal.get -

exit codes: 0 ok, 1 the daemon refused the call, 2 usage, 3 daemon not running,
4 connection lost or timed out, 130 interrupted""",
    "status": "examples:\n  omkctl status\n  omkctl status --json",
    "ping": "examples:\n  omkctl ping\n  omkctl --socket ~/omk/omkd.sock ping",
    "call": """\
examples:
  omkctl call daemon.status
  omkctl call goal.list '{"status": "running", "limit": 5}'
  echo '{"goal_id": "g-42"}' | omkctl call goal.get -""",
    "goal list": """\
examples:
  omkctl goal list
  omkctl goal list --status running --limit 10
  omkctl goal list --phase review --json""",
    "goal show": "examples:\n  omkctl goal show g-42\n  omkctl goal show g-42 --json",
    "task list": "examples:\n  omkctl task list g-42\n  omkctl task list g-42 --json",
    "events tail": """\
examples:
  omkctl events tail g-42               # the last 20 events
  omkctl events tail g-42 --limit 100
  omkctl events tail g-42 --after 1200  # every event after id 1200
  omkctl events tail g-42 --follow      # then wait for new ones (Ctrl-C stops)
  omkctl events tail g-42 --follow --json | jq .kind""",
    "backup": """\
examples:
  omkctl backup /var/backups/omk-$(date +%F).db
  omkctl backup ./omk-copy.db           # relative paths are made absolute here""",
}


class _Output:
    """Where a command writes, and in which form."""

    def __init__(self, as_json: bool, out: TextIO) -> None:
        self.json = as_json
        self.out = out

    def line(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def document(self, value: Any) -> None:
        self.line(msgspec.json.encode(value).decode() if self.json else _pretty(value))

    def table(self, rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> None:
        rows = [[_visible(c) if isinstance(c, str) else c for c in row] for row in rows]
        if rows:
            self.line(tabulate(rows, headers=headers, tablefmt="simple"))

    def fields(self, pairs: Iterable[tuple[str, Any]]) -> None:
        self.line(tabulate([(k, _cell(v)) for k, v in pairs], tablefmt="plain"))


# -- readable values


def ago(seconds: int | float | None, now: float | None = None) -> str:
    """Return "12 s ago", "3 min ago", "5 h ago" or "2 d ago" ("-" for None)."""
    if seconds is None:
        return "-"
    delta = (time.time() if now is None else now) - seconds
    if delta < 0:
        return "in the future"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if delta >= size:
            return f"{int(delta // size)} {unit} ago"
    return f"{int(delta)} s ago"


def local_time(seconds: int | None) -> str:
    """Return unix seconds as ISO local time, ``2026-11-27 14:03:12``."""
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def when(seconds: int | None) -> str:
    return "-" if seconds is None else f"{local_time(seconds)} ({ago(seconds)})"


def duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    if days or hours or minutes:
        parts.append(f"{minutes}m")
    parts.append(f"{secs}s")
    return " ".join(parts)


def _shorten(text: str, width: int) -> str:
    text = _visible(" ".join(text.split()))
    return text if len(text) <= width else text[: width - 1] + "…"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return _visible(value)
    return msgspec.json.encode(value).decode()


def _visible(text: str) -> str:
    """``text`` with what a terminal would act on (an escape sequence, a newline in a cell)
    written out as Python would: stored data must not drive the user's terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _pretty(value: Any) -> str:
    return json.dumps(msgspec.to_builtins(value), indent=2, ensure_ascii=False)


_TIME_FIELDS: Final = frozenset(
    {"created_at", "updated_at", "completed_at", "generated_at", "recorded_at"}
)


def _record_pairs(record: msgspec.Struct) -> list[tuple[str, Any]]:
    pairs = []
    for name in record.__struct_fields__:
        value = getattr(record, name)
        pairs.append((name, when(value) if name in _TIME_FIELDS else value))
    return pairs


# -- commands


def _status(client: Client, args: argparse.Namespace, out: _Output) -> int:
    status = client.daemon.status()
    if out.json:
        out.document(status)
        return EXIT_OK
    pairs = [(n, getattr(status, n)) for n in status.__struct_fields__]
    out.fields([(n, duration(v) if n == "uptime_s" else v) for n, v in pairs])
    return EXIT_OK


def _ping(client: Client, args: argparse.Namespace, out: _Output) -> int:
    started = time.perf_counter()
    answer = client.daemon.ping()
    elapsed_ms = (time.perf_counter() - started) * 1000
    if out.json:
        out.document({"result": answer, "round_trip_ms": round(elapsed_ms, 3)})
    else:
        out.line(f"{answer} from {client.socket_path} in {elapsed_ms:.2f} ms")
    return EXIT_OK


def _call(client: Client, args: argparse.Namespace, out: _Output) -> int:
    out.document(client.call(args.method, **(args.params or {})))
    return EXIT_OK


def _params_argument(text: str) -> dict[str, Any]:
    """PARAMS_JSON, read (from stdin for -) while the arguments are: a usage error before
    any connection."""
    if text == "-":
        text = sys.stdin.read()
    if not text.strip():
        return {}
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise argparse.ArgumentTypeError("must be a JSON object of named params")
    try:  # JSON may spell what UTF-8 cannot hold: a lone surrogate ("\ud800")
        msgspec.json.encode(params)
    except UnicodeEncodeError as exc:
        raise argparse.ArgumentTypeError(f"not sendable as UTF-8: {exc.reason}") from exc
    return params


def _seconds_argument(text: str) -> float:
    seconds = float(text)  # (argparse answers a ValueError as an invalid value)
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return seconds


def _count_argument(text: str) -> int:
    count = int(text)
    if count < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return count


def _goal_list(client: Client, args: argparse.Namespace, out: _Output) -> int:
    goals = client.goals.list(
        status=args.status, phase=args.phase, kind=args.kind, limit=args.limit
    )
    if out.json:
        out.document(goals)
        return EXIT_OK
    if not goals:
        out.line("no goals")
    rows = [
        (g.goal_id, g.status, g.phase, ago(g.updated_at), local_time(g.created_at),
         _shorten(g.goal_text, TEXT_WIDTH))
        for g in goals
    ]  # fmt: skip
    out.table(rows, ["GOAL", "STATUS", "PHASE", "UPDATED", "CREATED", "TEXT"])
    return EXIT_OK


def _goal_show(client: Client, args: argparse.Namespace, out: _Output) -> int:
    goal = client.goals.get(args.goal)
    if goal is None:
        raise _NoSuchGoal(args.goal)
    if out.json:
        out.document(goal)
    else:
        out.fields(_record_pairs(goal))
    return EXIT_OK


class _NoSuchGoal(Exception):
    def __init__(self, goal_id: str) -> None:
        super().__init__(f"no goal {goal_id!r} (omkctl goal list shows the goals)")


def _task_list(client: Client, args: argparse.Namespace, out: _Output) -> int:
    tasks = client.tasks.get_by_goal(args.goal)
    if not tasks and client.goals.get(args.goal) is None:  # ([] for an unknown goal)
        raise _NoSuchGoal(args.goal)
    if out.json:
        out.document(tasks)
        return EXIT_OK
    if not tasks:
        out.line(f"no tasks for goal {args.goal!r}")
    rows = [
        (t.task_id, t.kind, t.status, t.owner or "-", f"{t.retry_count}/{t.max_retries}",
         ago(t.updated_at), _shorten(t.title, TEXT_WIDTH))
        for t in tasks
    ]  # fmt: skip
    out.table(rows, ["TASK", "KIND", "STATUS", "OWNER", "RETRIES", "UPDATED", "TITLE"])
    return EXIT_OK


def _events_tail(client: Client, args: argparse.Namespace, out: _Output) -> int:
    events = _tail(client, args.goal, args.after, args.limit)
    # Following a goal not created yet is fine: its events are printed as they come.
    if not events and not args.follow and client.goals.get(args.goal) is None:
        raise _NoSuchGoal(args.goal)
    for event in events:
        _print_event(out, event)
    if not args.follow:
        if not events and not out.json:
            out.line(f"no events for goal {args.goal!r}")
        return EXIT_OK
    # Nothing printed: the goal has no events (after --after), so its whole log is new.
    after = events[-1].event_id if events else (args.after or 0)
    with client.events.subscribe(args.goal, after_event_id=after) as subscription:
        try:
            for event in subscription:
                _print_event(out, event)
        except ConnectionLost as exc:
            resume = f"omkctl events tail {args.goal} --follow --after {subscription.last_event_id}"
            raise ConnectionLost(f"{exc.message}; to go on: {resume}", exc.data) from exc
    return EXIT_OK


def _tail(client: Client, goal_id: str, after: int | None, limit: int | None) -> list[EventRecord]:
    """With ``after``: the events after it (up to ``limit``); else the last ``limit``."""
    if after is not None:
        return client.events.get_by_goal(goal_id, after_event_id=after, limit=limit)
    return client.events.get_by_goal(goal_id, tail=DEFAULT_TAIL if limit is None else limit)


def _print_event(out: _Output, event: EventRecord) -> None:
    if out.json:
        out.line(msgspec.json.encode(event).decode())
        return
    payload = _shorten(msgspec.json.encode(event.payload).decode(), PAYLOAD_WIDTH)
    out.line(
        f"{event.event_id:>8}  {local_time(event.created_at)}  {_visible(event.kind):<20} "
        f"{_visible(event.actor or '-'):<12} {payload}"
    )


def _backup(client: Client, args: argparse.Namespace, out: _Output) -> int:
    dest = Path(args.dest).expanduser().absolute()
    result = client.backup(dest)
    if out.json:
        out.document(result)
    else:
        out.line(f"wrote {result.path} ({result.bytes} bytes)")
    return EXIT_OK


# -- the parser


def _common() -> argparse.ArgumentParser:
    """Options every command takes, before or after its name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="daemon socket (default: $OMKD_SOCKET, "
        "$XDG_RUNTIME_DIR/omk/omkd.sock, /tmp/omk-UID/omkd.sock)",
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="machine output: JSON instead of tables",
    )
    common.add_argument(
        "--timeout",
        type=_seconds_argument,
        default=argparse.SUPPRESS,
        metavar="S",
        help=f"seconds to wait for each reply (default {DEFAULT_CALL_TIMEOUT:g})",
    )
    return common  # fmt: skip


Handler = Callable[[Client, argparse.Namespace, _Output], int]


def _parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="omkctl",
        description="omkctl: look at and drive a running omkd daemon.",
        epilog=_EXAMPLES["omkctl"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        parent: Any, name: str, key: str, handler: Handler, help: str
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(
            name, help=help, description=help, epilog=_EXAMPLES[key], parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        sub.set_defaults(handler=handler)
        return sub

    command(commands, "status", "status", _status, "the daemon's version, paths and counts")
    command(commands, "ping", "ping", _ping, "check that the daemon answers")
    call = command(commands, "call", "call", _call, "call any method; print its result as JSON")
    call.add_argument("method", metavar="METHOD", help="e.g. goal.get (see rpc.discover)")
    call.add_argument("params", metavar="PARAMS_JSON", nargs="?", type=_params_argument,
                      help="a JSON object of named params; - reads it from stdin")  # fmt: skip

    goal = commands.add_parser("goal", help="goals", description="goals: list, show")
    goals = goal.add_subparsers(dest="goal_command", required=True, metavar="COMMAND")
    listing = command(goals, "list", "goal list", _goal_list, "goals, newest update first")
    listing.add_argument("--status", help="only goals with this status")
    listing.add_argument("--phase", help="only goals in this phase")
    listing.add_argument("--kind", help="only goals of this kind")
    listing.add_argument("--limit", type=_count_argument, help="at most this many goals")
    show = command(goals, "show", "goal show", _goal_show, "every field of one goal")
    show.add_argument("goal", metavar="GOAL", help="goal id")

    task = commands.add_parser("task", help="tasks", description="tasks: list")
    tasks = task.add_subparsers(dest="task_command", required=True, metavar="COMMAND")
    task_list = command(tasks, "list", "task list", _task_list, "a goal's tasks in order")
    task_list.add_argument("goal", metavar="GOAL", help="goal id")

    events = commands.add_parser("events", help="events", description="events: tail")
    event_commands = events.add_subparsers(dest="events_command", required=True,
                                           metavar="COMMAND")  # fmt: skip
    tail = command(event_commands, "tail", "events tail", _events_tail,
                   "a goal's latest events; --follow waits for new ones")  # fmt: skip
    tail.add_argument("goal", metavar="GOAL", help="goal id")
    tail.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="keep printing events as they are committed (Ctrl-C stops)",
    )
    tail.add_argument(
        "--after",
        type=int,
        metavar="ID",
        help="start after this event id instead of showing the last ones",
    )
    tail.add_argument(
        "--limit",
        "-n",
        type=_count_argument,
        metavar="N",
        help=f"at most N events (default: the last {DEFAULT_TAIL})",
    )

    backup = command(commands, "backup", "backup", _backup,
                     "have the daemon write a consistent copy of the database")  # fmt: skip
    backup.add_argument("dest", metavar="DEST", help="path of the copy (replaced if it exists)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run omkctl; return the exit code (the console script exits with it)."""
    parser = _parser()
    args = parser.parse_args(argv)
    out = _Output(getattr(args, "json", False), sys.stdout)
    try:
        with Client.connect(
            getattr(args, "socket", None),
            connect_timeout=DEFAULT_CONNECT_TIMEOUT,
            call_timeout=getattr(args, "timeout", DEFAULT_CALL_TIMEOUT),
        ) as client:
            code: int = args.handler(client, args, out)
            return code
    except (_NoSuchGoal, DaemonError) as exc:
        return _fail(EXIT_DAEMON_ERROR, exc)
    except DaemonNotRunning as exc:
        return _fail(EXIT_NOT_RUNNING, exc)
    except SubscriptionClosed as exc:
        return _fail(EXIT_CONNECTION, exc)
    except OmkdError as exc:
        return _fail(EXIT_CONNECTION, exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed early (| head): nothing more to say, and nowhere to say it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _fail(code: int, exc: BaseException) -> int:
    print(f"omkctl: {exc}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
