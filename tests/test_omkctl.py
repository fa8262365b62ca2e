"""omkctl against a daemon subprocess: human and --json output, and its error exits."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from omkd_client import Client, TaskRecord
from omkd_client.cli import (
    EXIT_CONNECTION,
    EXIT_DAEMON_ERROR,
    EXIT_INTERRUPTED,
    EXIT_NOT_RUNNING,
    EXIT_USAGE,
    ago,
    main,
)

from client_helpers import Daemon, daemon_process, make_goal, short_dir, unique


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with daemon_process() as d:
        yield d


@pytest.fixture(scope="module")
def goal_id(daemon: Daemon) -> str:
    """A goal with two tasks and 25 events."""
    with Client.connect(daemon.socket_path) as c:
        gid = c.goals.create(make_goal(unique("cli"), goal_text="ship omkctl")).goal_id
        c.tasks.create_batch(gid, [TaskRecord(task_id=unique("t"), goal_id=gid, kind="code",
                                              title=f"task {i}") for i in range(2)])  # fmt: skip
        for i in range(25):
            c.events.append(gid, "step", {"i": i}, actor="tester")
    return gid


def run(daemon: Daemon, capsys: Any, *args: str) -> tuple[int, str, str]:
    code = main(["--socket", str(daemon.socket_path), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_status_human_and_json(daemon: Daemon, capsys: Any) -> None:
    code, out, _ = run(daemon, capsys, "status")
    assert code == 0 and "schema_version" in out and str(daemon.socket_path) in out
    code, out, _ = run(daemon, capsys, "status", "--json")
    assert code == 0 and json.loads(out)["socket_path"] == str(daemon.socket_path)


def test_ping(daemon: Daemon, capsys: Any) -> None:
    assert run(daemon, capsys, "ping")[1].startswith("pong from ")
    assert json.loads(run(daemon, capsys, "ping", "--json")[1])["result"] == "pong"


def test_goal_list_and_show(daemon: Daemon, goal_id: str, capsys: Any) -> None:
    code, out, _ = run(daemon, capsys, "goal", "list", "--status", "running")
    header = out.splitlines()[0].split()
    assert code == 0 and header == ["GOAL", "STATUS", "PHASE", "UPDATED", "CREATED", "TEXT"]
    assert goal_id in out and "ago" in out
    code, out, _ = run(daemon, capsys, "goal", "list", "--json", "--limit", "1")
    assert code == 0 and len(json.loads(out)) == 1
    code, out, _ = run(daemon, capsys, "goal", "list", "--status", "no-such-status")
    assert code == 0 and "no goals" in out
    code, out, _ = run(daemon, capsys, "goal", "show", goal_id)
    assert code == 0 and "ship omkctl" in out and "created_at" in out
    code, out, _ = run(daemon, capsys, "--json", "goal", "show", goal_id)
    assert json.loads(out)["goal_id"] == goal_id


def test_stored_text_does_not_drive_the_terminal(daemon: Daemon, capsys: Any) -> None:
    text = "red \x1b[31malert\x1b[0m\nsecond line\x07"
    with Client.connect(daemon.socket_path) as c:
        gid = c.goals.create(make_goal(unique("esc"), goal_text=text, phase="p\x1b]0;x")).goal_id
    for args in (("goal", "show", gid), ("goal", "list")):
        code, out, _ = run(daemon, capsys, *args)
        assert code == 0 and "\x1b" not in out and "\x07" not in out
        assert "\\x1b[31malert" in out  # written out, readable
    code, out, _ = run(daemon, capsys, "--json", "goal", "show", gid)
    assert json.loads(out)["goal_text"] == text  # --json gives the data as it is


def test_lists_of_an_unknown_goal_say_so(daemon: Daemon, capsys: Any) -> None:
    for args in (("task", "list", "nope"), ("events", "tail", "nope"),
                 ("--json", "task", "list", "nope")):  # fmt: skip
        code, out, err = run(daemon, capsys, *args)
        assert code == EXIT_DAEMON_ERROR and out == "" and err.startswith("omkctl: no goal")


def test_task_list(daemon: Daemon, goal_id: str, capsys: Any) -> None:
    code, out, _ = run(daemon, capsys, "task", "list", goal_id)
    assert code == 0 and "TASK" in out and "task 1" in out
    code, out, _ = run(daemon, capsys, "task", "list", goal_id, "--json")
    assert [t["title"] for t in json.loads(out)] == ["task 0", "task 1"]


def test_events_tail(daemon: Daemon, goal_id: str, capsys: Any) -> None:
    code, out, _ = run(daemon, capsys, "events", "tail", goal_id)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 20 and '{"i":24}' in lines[-1] and "tester" in lines[-1]
    code, out, _ = run(daemon, capsys, "events", "tail", goal_id, "--json", "-n", "3")
    assert [json.loads(line)["payload"]["i"] for line in out.splitlines()] == [22, 23, 24]
    first = json.loads(out.splitlines()[0])["event_id"]
    code, out, _ = run(daemon, capsys, "events", "tail", goal_id, "--after", str(first), "--json")
    assert [json.loads(line)["payload"]["i"] for line in out.splitlines()] == [23, 24]
    code, out, _ = run(daemon, capsys, "events", "tail", goal_id, "-n", "0", "--json")
    assert code == 0 and out == ""  # at most none: none, not the default 20


@pytest.mark.parametrize(
    "args",
    [["--timeout", "-1", "ping"], ["--timeout", "0", "ping"], ["--timeout", "nan", "ping"],
     ["goal", "list", "--limit", "-1"], ["events", "tail", "g", "-n", "-2"],
     ["call", "goal.get", "{not json"], ["call", "goal.get", "[1]"]],
)  # fmt: skip
def test_bad_arguments_are_usage_errors_before_any_connection(args: list[str], capsys: Any) -> None:
    with short_dir() as directory, pytest.raises(SystemExit) as usage:
        main(["--socket", str(directory / "none.sock"), *args])  # no daemon: never asked
    assert usage.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: argument" in err


def test_call_with_params_and_stdin(
    daemon: Daemon, goal_id: str, capsys: Any, monkeypatch: Any
) -> None:
    code, out, _ = run(daemon, capsys, "call", "goal.get", json.dumps({"goal_id": goal_id}))
    assert code == 0 and json.loads(out)["goal_id"] == goal_id
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"goal_id": goal_id})))
    code, out, _ = run(daemon, capsys, "call", "goal.heartbeat", "-", "--json")
    assert code == 0 and json.loads(out)["goal_id"] == goal_id
    assert json.loads(run(daemon, capsys, "call", "daemon.ping")[1]) == "pong"


def test_backup_makes_relative_paths_absolute(
    daemon: Daemon, capsys: Any, monkeypatch: Any
) -> None:
    monkeypatch.chdir(daemon.directory)
    code, out, _ = run(daemon, capsys, "backup", "copy.db")
    assert code == 0 and str(daemon.directory / "copy.db") in out
    assert (daemon.directory / "copy.db").stat().st_size > 0


def test_error_exits(daemon: Daemon, capsys: Any) -> None:
    code, out, err = run(daemon, capsys, "goal", "show", unique())
    assert code == EXIT_DAEMON_ERROR and out == "" and err.startswith("omkctl: no goal")
    code, _, err = run(daemon, capsys, "call", "goal.heartbeat", json.dumps({"goal_id": "x"}))
    assert code == EXIT_DAEMON_ERROR and "not found" in err and "-32001" in err
    code, _, err = run(daemon, capsys, "call", "no.such.method")
    assert code == EXIT_DAEMON_ERROR and "method not found" in err
    with pytest.raises(SystemExit) as usage:
        run(daemon, capsys, "call", "goal.get", "{not json")
    assert usage.value.code == EXIT_USAGE and "not JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # JSON, but no UTF-8 holds a lone surrogate
        run(daemon, capsys, "call", "goal.get", '{"goal_id": "\\ud800"}')
    assert usage.value.code == EXIT_USAGE and "UTF-8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["goal", "frob"])
    assert usage.value.code == EXIT_USAGE
    capsys.readouterr()
    with short_dir() as directory:
        code = main(["--socket", str(directory / "none.sock"), "status"])
    err = capsys.readouterr().err
    assert code == EXIT_NOT_RUNNING and err.count("\n") == 1 and "omkd serve" in err


@pytest.mark.parametrize(
    "command",
    [[], ["status"], ["ping"], ["call"], ["goal", "list"], ["goal", "show"], ["task", "list"],
     ["events", "tail"], ["backup"]],
)  # fmt: skip
def test_help_with_examples_on_every_command(command: list[str], capsys: Any) -> None:
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "examples:" in out and "--json" in out


def test_ago() -> None:
    assert ago(1000, now=1030) == "30 s ago"
    assert ago(1000, now=1000 + 180) == "3 min ago"
    assert ago(1000, now=1000 + 7200) == "2 h ago"
    assert ago(None) == "-"


# The console entry point with Ctrl-C as a terminal delivers it: a test run started in the
# background (a shell's `cmd &`) has SIGINT ignored, and a child would inherit that.
_CLI_WITH_CTRL_C = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('omkd_client.cli', run_name='__main__', alter_sys=True)"
)


def test_events_tail_follow_in_a_subprocess(daemon: Daemon, goal_id: str) -> None:
    """The console entry point: a traceback-free stream, stopped by Ctrl-C."""
    command = [sys.executable, "-c", _CLI_WITH_CTRL_C, "--socket", str(daemon.socket_path),
               "events", "tail", goal_id, "--follow", "--json", "-n", "1"]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:  # fmt: skip
        assert process.stdout is not None and process.stderr is not None
        assert json.loads(process.stdout.readline())["payload"] == {"i": 24}
        with Client.connect(daemon.socket_path) as c:
            c.events.append(goal_id, "followed", {"live": True})
        assert json.loads(process.stdout.readline())["kind"] == "followed"
        os.kill(process.pid, signal.SIGINT)
        assert process.wait(10) == EXIT_INTERRUPTED
        assert "Traceback" not in process.stderr.read()


def test_events_tail_follow_says_how_to_go_on_when_the_daemon_stops() -> None:
    with daemon_process() as daemon:
        with Client.connect(daemon.socket_path) as c:
            gid = c.goals.create(make_goal()).goal_id
            last = c.events.append(gid, "k", {}).event_id
        command = [sys.executable, "-m", "omkd_client.cli", "--socket", str(daemon.socket_path),
                   "events", "tail", gid, "--follow", "--json"]  # fmt: skip
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) as process:  # fmt: skip
            assert process.stdout is not None and process.stderr is not None
            assert json.loads(process.stdout.readline())["event_id"] == last
            # An event only the subscription prints: omkctl is subscribed once it has. (Had
            # the daemon stopped before omkctl subscribed, its subscribe would find nothing
            # answering: exit 3, "not running".)
            with Client.connect(daemon.socket_path) as c:
                last = c.events.append(gid, "k", {}).event_id
            assert json.loads(process.stdout.readline())["event_id"] == last
            daemon.stop()
            assert process.wait(10) == EXIT_CONNECTION
            resume = f"omkctl events tail {gid} --follow --after {last}"
            assert resume in process.stderr.read()
