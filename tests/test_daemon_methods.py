"""Every method of the contract over a real socket, with its results and error codes."""

from __future__ import annotations

import gc
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import trio

import omkd
from omkd.db import load_migrations
from omkd.rpc.methods import METHODS
from omkd.server import Daemon
from omkd_client.codes import ErrorCode

from rpc_helpers import RawClient, RpcError, goal, running_daemon, short_tempdir


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    with short_tempdir() as directory:
        async with running_daemon(directory) as d:
            yield d


@pytest.fixture
async def client(daemon: Daemon) -> AsyncIterator[RawClient]:
    c = await RawClient.connect(daemon.config.socket_path)
    yield c
    await c.aclose()


async def test_ping_status_discover(client: RawClient, daemon: Daemon) -> None:
    assert await client.call("daemon.ping") == "pong"
    status = await client.call("daemon.status")
    assert status["db_path"] == daemon.config.db_path
    assert status["socket_path"] == daemon.config.socket_path
    assert status["schema_version"] == load_migrations()[-1].version
    assert status["sessions"] == 1 and status["active_transactions"] == 0
    assert status["uptime_s"] >= 0 and status["pid"] == os.getpid()  # (in-process daemon)
    assert status["version"] == omkd.__version__
    doc = await client.call("rpc.discover")
    assert doc["openrpc"].startswith("1.")
    assert sorted(m["name"] for m in doc["methods"]) == sorted(METHODS)
    create = next(m for m in doc["methods"] if m["name"] == "goal.create")
    required = {p["name"] for p in create["params"] if p["required"]}
    assert required == {"goal_id", "status", "phase", "goal_text", "project_dir"}
    version = next(p for p in create["params"] if p["name"] == "version")
    assert version["schema"]["maximum"] == 2**53 - 1  # what the daemon takes
    errors = {m["name"]: {e["code"] for e in m["errors"]} for m in doc["methods"]}
    assert all(ErrorCode.INVALID_PARAMS in codes for codes in errors.values())
    assert errors["event.append"] == {ErrorCode.INVALID_PARAMS, ErrorCode.NOT_FOUND,
                                      ErrorCode.BUSY, ErrorCode.STORAGE_FAILURE,
                                      ErrorCode.TRANSACTION_ABORTED}  # fmt: skip
    assert ErrorCode.BUSY not in errors["goal.get"]
    assert ErrorCode.STORAGE_FAILURE in errors["tx.commit"]
    assert ErrorCode.TRANSACTION_ABORTED not in errors["tx.rollback"] | errors["daemon.ping"]


async def test_every_result_matches_its_published_schema(client: RawClient, daemon: Daemon) -> None:
    """What rpc.discover says a method returns is what it returns: every field of a record
    present (assigned ids too), and nothing that is not in the schema."""
    doc = await client.call("rpc.discover")
    components = doc["components"]
    results = {m["name"]: m["result"]["schema"] for m in doc["methods"]}
    seen: set[str] = set()

    async def check(method: str, **params: Any) -> Any:
        result = await client.call(method, **params)
        jsonschema.validate(result, {**results[method], "components": components})
        seen.add(method)
        return result

    task = {"task_id": "t1", "kind": "code"}
    await check("goal.create", **goal("g1", kind=None))
    await check("goal.upsert", **goal("g2"))
    await check("goal.get", goal_id="g1")
    await check("goal.get", goal_id="nope")
    await check("goal.update_status", goal_id="g1", status="s", phase="p")
    await check("goal.update", goal_id="g1", expected_version=2, changes={"max_agents": 2})
    await check("goal.heartbeat", goal_id="g1")
    await check("goal.list")
    await check("task.create_batch", goal_id="g1", tasks=[task])
    await check("task.get", task_id="t1")
    await check("task.get_by_goal", goal_id="g1")
    await check("task.update_status", task_id="t1", status="done")
    await check("task.update_task_graph", goal_id="g1", tasks=[task])
    await check("event.append", goal_id="g1", kind="k", payload={"a": [1]})
    await check("event.append_batch", goal_id="g1", events=[{"kind": "k", "payload": 1}])
    await check("event.get_by_goal", goal_id="g1")
    await check("event.get_by_goal", goal_id="g1", limit=5000)  # (a long read's own path)
    subscribed = await check("event.subscribe", goal_id="g1")
    await check("event.unsubscribe", subscription=subscribed["subscription"])
    await check("proof.upsert", goal_id="g1", status="ready")
    await check("proof.get", goal_id="g1")
    await check("budget.append_checkpoint", goal_id="g1", label="l")
    await check("budget.get_by_goal", goal_id="g1")
    artifact = await check("artifact.register", goal_id="g1", kind="k", path="/a")
    await check("artifact.get_by_goal", goal_id="g1")
    await check("artifact.delete", artifact_id=artifact["artifact_id"])
    await check("artifact.delete_by_goal", goal_id="g1")
    await check("budget.delete_by_goal", goal_id="g1")
    await check("proof.delete", goal_id="g1")
    await check("event.delete_by_goal", goal_id="g1")
    await check("task.delete_by_goal", goal_id="g1")
    await check("goal.delete", goal_id="g2")
    await check("tx.begin")
    await check("tx.commit")
    await check("tx.begin")
    await check("tx.rollback")
    await check("db.backup", dest=str(Path(daemon.config.db_path).parent / "copy.db"))
    await check("daemon.ping")
    await check("daemon.status")
    await check("rpc.discover")
    assert seen == set(METHODS)
    # An assigned id is never null in a result, though optional as params.
    budget = components["schemas"]["BudgetCheckpoint"]
    assert budget["properties"]["checkpoint_id"]["type"] == "integer"
    assert "checkpoint_id" in budget["required"]
    create = next(m for m in doc["methods"] if m["name"] == "goal.create")
    assert not any(p["required"] for p in create["params"] if p["name"] == "kind")


async def test_goal_lifecycle(client: RawClient) -> None:
    created = await client.call("goal.create", **goal("g1", budget_usd=1250))
    assert created["version"] == 1 and created["budget_usd"] == 1250
    assert (await client.error("goal.create", **goal("g1")))["code"] == ErrorCode.CONFLICT
    assert await client.call("goal.get", goal_id="g1") == created
    assert await client.call("goal.get", goal_id="nope") is None

    updated = await client.call("goal.update_status", goal_id="g1", status="done", phase="end")
    assert (updated["status"], updated["phase"], updated["version"]) == ("done", "end", 2)
    changed = await client.call(
        "goal.update", goal_id="g1", expected_version=2, changes={"max_agents": 4}
    )
    assert changed["max_agents"] == 4 and changed["version"] == 3
    stale = await client.error(
        "goal.update", goal_id="g1", expected_version=2, changes={"max_agents": 5}
    )
    assert stale["code"] == ErrorCode.VERSION_CONFLICT
    assert {k: stale["data"][k] for k in ("kind", "id", "expected", "actual")} == {
        "kind": "goal", "id": "g1", "expected": 2, "actual": 3
    }  # fmt: skip
    beat = await client.call("goal.heartbeat", goal_id="g1")
    assert beat["version"] == 3 and beat["updated_at"] >= changed["updated_at"]
    upserted = await client.call("goal.upsert", **goal("g1", version=1, phase="again"))
    assert upserted["version"] == 4 and upserted["phase"] == "again"

    for method, params in [
        ("goal.update_status", {"goal_id": "x", "status": "a", "phase": "b"}),
        ("goal.update", {"goal_id": "x", "expected_version": 1, "changes": {}}),
        ("goal.heartbeat", {"goal_id": "x"}),
        ("goal.delete", {"goal_id": "x"}),
    ]:
        error = await client.error(method, **params)
        assert error["code"] == ErrorCode.NOT_FOUND, method
        assert error["data"]["id"] == "x"
    assert await client.call("goal.delete", goal_id="g1") == {"deleted": True}
    assert await client.call("goal.get", goal_id="g1") is None


async def test_goal_list_filters_and_order(client: RawClient) -> None:
    for i, status in enumerate(["active", "done", "active"]):
        await client.call("goal.create", **goal(f"g{i}", status=status, updated_at=100 + i))
    listed = await client.call("goal.list")
    assert [g["goal_id"] for g in listed] == ["g2", "g1", "g0"]
    assert set(listed[0]) == {"goal_id", "status", "phase", "goal_text", "created_at", "updated_at"}
    active = await client.call("goal.list", status="active")
    assert [g["goal_id"] for g in active] == ["g2", "g0"]
    assert [g["goal_id"] for g in await client.call("goal.list", older_than=102)] == ["g1", "g0"]
    assert len(await client.call("goal.list", limit=1)) == 1


async def test_tasks(client: RawClient) -> None:
    await client.call("goal.create", **goal("g1"))
    tasks = [{"task_id": f"t{i}", "kind": "code"} for i in range(3)]
    assert await client.call("task.create_batch", goal_id="g1", tasks=tasks) == {"created": 3}
    got = await client.call("task.get_by_goal", goal_id="g1")
    assert [t["task_id"] for t in got] == ["t0", "t1", "t2"]
    assert all(t["goal_id"] == "g1" and t["status"] == "pending" for t in got)
    assert (await client.call("task.get", task_id="t1"))["kind"] == "code"
    assert await client.call("task.get", task_id="nope") is None
    done = await client.call("task.update_status", task_id="t1", status="done")
    assert done["status"] == "done"
    assert (await client.error("task.update_status", task_id="x", status="a"))["code"] == (
        ErrorCode.NOT_FOUND
    )
    dup = await client.error("task.create_batch", goal_id="g1", tasks=[tasks[0]])
    assert dup["code"] == ErrorCode.CONFLICT
    other = [{"task_id": "t9", "kind": "k", "goal_id": "g2"}]
    assert (await client.error("task.create_batch", goal_id="g1", tasks=other))["code"] == (
        ErrorCode.INVALID_PARAMS
    )
    missing = await client.error("task.create_batch", goal_id="nope", tasks=[tasks[0]])
    assert missing["code"] == ErrorCode.NOT_FOUND
    # All or nothing: the second task of this batch collides, so the first is not kept.
    mixed = [{"task_id": "new", "kind": "k"}, tasks[1]]
    assert (await client.error("task.create_batch", goal_id="g1", tasks=mixed))["code"] == (
        ErrorCode.CONFLICT
    )
    assert await client.call("task.get", task_id="new") is None
    graph = [{"task_id": "a", "kind": "k"}, {"task_id": "b", "kind": "k", "depends_on": ["a"]}]
    assert await client.call("task.update_task_graph", goal_id="g1", tasks=graph) == {"replaced": 2}
    got = await client.call("task.get_by_goal", goal_id="g1")
    assert [(t["task_id"], t["depends_on"]) for t in got] == [("a", None), ("b", ["a"])]
    assert await client.call("task.delete_by_goal", goal_id="g1") == {"deleted": 2}


async def test_events(client: RawClient) -> None:
    await client.call("goal.create", **goal("g1"))
    payload = {"text": "héllo ✓", "deep": [[[{"n": 2**70}]]], "neg": -(2**80)}
    first = await client.call(
        "event.append",
        goal_id="g1",
        kind="note",
        payload=payload,
        actor="me",
        run_id="r1",
        event_uuid="u-1",
    )
    assert first["payload"] == payload and first["actor"] == "me"
    batch = [{"kind": "step", "payload": i} for i in range(5)]
    ids = (await client.call("event.append_batch", goal_id="g1", events=batch))["event_ids"]
    assert ids == sorted(ids) and ids[0] > first["event_id"] and len(ids) == 5
    page = await client.call("event.get_by_goal", goal_id="g1")
    assert [e["event_id"] for e in page] == [first["event_id"], *ids]
    assert page[0]["payload"] == payload
    after = await client.call("event.get_by_goal", goal_id="g1", after_event_id=ids[1], limit=2)
    assert [e["event_id"] for e in after] == ids[2:4]
    since = await client.call("event.get_by_goal", goal_id="g1", since=first["created_at"] + 10)
    assert since == []
    assert await client.call("event.get_by_goal", goal_id="nope") == []
    newest = await client.call("event.get_by_goal", goal_id="g1", tail=2)
    assert [e["event_id"] for e in newest] == ids[3:]  # the newest two, still ascending
    below = await client.call("event.get_by_goal", goal_id="g1", after_event_id=ids[3], tail=9)
    assert [e["event_id"] for e in below] == ids[4:]
    both = await client.error("event.get_by_goal", goal_id="g1", tail=2, limit=2)
    assert both["code"] == ErrorCode.INVALID_PARAMS and both["data"]["field"] == "tail"
    missing = await client.error("event.append", goal_id="nope", kind="k", payload=None)
    assert missing["code"] == ErrorCode.NOT_FOUND
    bad_batch = [{"kind": "ok", "payload": 1}, {"kind": 5, "payload": 1}]
    error = await client.error("event.append_batch", goal_id="g1", events=bad_batch)
    assert error["code"] == ErrorCode.INVALID_PARAMS
    assert len(await client.call("event.get_by_goal", goal_id="g1")) == 6
    assert await client.call("event.delete_by_goal", goal_id="g1") == {"deleted": 6}


async def test_proofs_budgets_artifacts(client: RawClient) -> None:
    await client.call("goal.create", **goal("g1"))
    proof = await client.call(
        "proof.upsert",
        goal_id="g1",
        status="ready",
        gates_passed=2,
        gates_total=3,
        changed_files=["a.py"],
    )
    assert proof["changed_files"] == ["a.py"] and proof["post_mutation_gates_ran"] is False
    again = await client.call("proof.upsert", goal_id="g1", status="final", gates_total=3)
    assert (await client.call("proof.get", goal_id="g1"))["status"] == again["status"] == "final"
    assert (await client.error("proof.upsert", goal_id="nope", status="x"))["code"] == (
        ErrorCode.NOT_FOUND
    )
    assert await client.call("proof.delete", goal_id="g1") == {"deleted": 1}
    assert await client.call("proof.delete", goal_id="g1") == {"deleted": 0}
    assert await client.call("proof.get", goal_id="g1") is None

    for i in range(3):
        cp = await client.call(
            "budget.append_checkpoint", goal_id="g1", label=f"c{i}", estimated_cost_usd=100 * i
        )
        assert isinstance(cp["checkpoint_id"], int)
    cps = await client.call("budget.get_by_goal", goal_id="g1")
    assert [c["label"] for c in cps] == ["c0", "c1", "c2"]
    float_money = await client.error(
        "budget.append_checkpoint", goal_id="g1", estimated_cost_usd=1.5
    )
    assert float_money["code"] == ErrorCode.INVALID_PARAMS
    assert float_money["data"]["field"] == "estimated_cost_usd"
    assigned = await client.error("budget.append_checkpoint", goal_id="g1", checkpoint_id=7)
    assert assigned["code"] == ErrorCode.INVALID_PARAMS
    assert await client.call("budget.delete_by_goal", goal_id="g1") == {"deleted": 3}

    a = await client.call("artifact.register", goal_id="g1", kind="log", path="/a.log")
    await client.call(
        "artifact.register", goal_id="g1", kind="diff", path="/b.diff", mime_type="text/x-diff"
    )
    assert [x["path"] for x in await client.call("artifact.get_by_goal", goal_id="g1")] == [
        "/a.log",
        "/b.diff",
    ]
    logs = await client.call("artifact.get_by_goal", goal_id="g1", kind="log")
    assert [x["artifact_id"] for x in logs] == [a["artifact_id"]]
    assert await client.call("artifact.delete", artifact_id=a["artifact_id"]) == {"deleted": True}
    assert await client.call("artifact.delete", artifact_id=a["artifact_id"]) == {"deleted": False}
    assert await client.call("artifact.delete_by_goal", goal_id="g1") == {"deleted": 1}


async def test_goal_delete_cascades(client: RawClient) -> None:
    await client.call("goal.create", **goal("g1"))
    await client.call("task.create_batch", goal_id="g1", tasks=[{"task_id": "t", "kind": "k"}])
    await client.call("event.append", goal_id="g1", kind="k", payload=1)
    await client.call("proof.upsert", goal_id="g1", status="s")
    await client.call("budget.append_checkpoint", goal_id="g1")
    await client.call("artifact.register", goal_id="g1", kind="k", path="/p")
    await client.call("goal.delete", goal_id="g1")
    assert await client.call("task.get", task_id="t") is None
    assert await client.call("event.get_by_goal", goal_id="g1") == []
    assert await client.call("proof.get", goal_id="g1") is None
    assert await client.call("budget.get_by_goal", goal_id="g1") == []
    assert await client.call("artifact.get_by_goal", goal_id="g1") == []


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("goal.get", {"goal_id": "g", "unknown": 1}, "unknown"),
        ("goal.get", {}, "goal_id"),
        ("goal.get", {"goal_id": 5}, "goal_id"),
        ("goal.list", {"limit": -1}, "limit"),
        # Refused by the storage layer's checks rather than the params' decoder:
        ("event.get_by_goal", {"goal_id": "g", "limit": 1, "tail": 1}, "tail"),
        (
            "task.create_batch",
            {"goal_id": "g", "tasks": [{"task_id": "t1", "kind": "k", "goal_id": "h"}]},
            "tasks[0].goal_id",
        ),
        # Inside an element of a list: the field, not only the element.
        ("task.create_batch", {"goal_id": "g", "tasks": [{"task_id": "t1", "kind": "k"},
                                                         {"task_id": "t2", "kind": "k",
                                                          "foo": 1}]}, "tasks[1].foo"),
        ("event.append_batch", {"goal_id": "g", "events": [{"kind": "k", "payload": 1},
                                                           {"kind": "k"}]}, "events[1].payload"),
        ("task.create_batch", {"goal_id": "g", "tasks": [{"task_id": "t1", "kind": "k",
                                                          "retry_count": "3"}]},
         "tasks[0].retry_count"),
    ],
)  # fmt: skip
async def test_invalid_params_name_the_method_and_field_and_say_why(
    client: RawClient, method: str, params: dict[str, Any], field: str
) -> None:
    error = await client.error(method, **params)
    assert error["code"] == ErrorCode.INVALID_PARAMS
    assert error["data"]["method"] == method
    assert error["data"]["field"] == field
    assert error["data"]["detail"]


async def test_positional_params_refused(client: RawClient) -> None:
    reply = await client.request("goal.get", ["g1"])
    assert reply["error"]["code"] == ErrorCode.INVALID_PARAMS
    assert reply["error"]["data"]["method"] == "goal.get" and reply["error"]["data"]["detail"]


async def test_money_as_float_refused(client: RawClient) -> None:
    error = await client.error("goal.create", **goal("g1", budget_usd=10.5))
    assert error["code"] == ErrorCode.INVALID_PARAMS and error["data"]["field"] == "budget_usd"
    assert await client.call("goal.get", goal_id="g1") is None


TOO_BIG = 2**63  # one past SQLite's largest integer
TOO_SMALL = -(2**63) - 1


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("goal.create", goal("g1", max_agents=TOO_BIG), "max_agents"),
        ("goal.create", goal("g1", budget_usd=TOO_SMALL), "budget_usd"),
        ("goal.upsert", goal("g1", version=2**53), "version"),  # past 2^53 - 1, the schema's
        ("goal.list", {"older_than": 2**64 - 1}, "older_than"),
        ("goal.update", {"goal_id": "g0", "expected_version": 1,
                         "changes": {"budget_tokens": TOO_BIG}}, "budget_tokens"),
        ("event.append", {"goal_id": "g0", "kind": "k", "payload": 1,
                          "schema_version": TOO_BIG}, "schema_version"),
        ("event.get_by_goal", {"goal_id": "g0", "limit": TOO_BIG}, "limit"),
        ("event.get_by_goal", {"goal_id": "g0", "after_event_id": TOO_BIG}, "after_event_id"),
        ("task.create_batch", {"goal_id": "g0", "tasks": [{"task_id": "t", "kind": "k",
                                                           "retry_count": TOO_BIG}]},
         "tasks[0].retry_count"),
        ("budget.append_checkpoint", {"goal_id": "g0", "used_tokens": TOO_BIG}, "used_tokens"),
        ("artifact.delete", {"artifact_id": TOO_SMALL}, "artifact_id"),
    ],
)  # fmt: skip
async def test_integers_beyond_64_bits_are_invalid_params_naming_the_field(
    client: RawClient, method: str, params: dict[str, Any], field: str
) -> None:
    # They decode as Python ints; SQLite cannot store them (an OverflowError, once a -32603).
    await client.call("goal.create", **goal("g0"))
    error = await client.error(method, **params)
    assert error["code"] == ErrorCode.INVALID_PARAMS, error
    assert error["data"]["field"] == field
    assert (await client.call("goal.get", goal_id="g0"))["version"] == 1  # nothing written
    assert await client.call("event.get_by_goal", goal_id="g0") == []
    largest = {"goal_id": "g0", "kind": "k", "payload": TOO_BIG, "schema_version": TOO_BIG - 1}
    stored = await client.call("event.append", **largest)  # the largest fits; JSON keeps any
    assert (stored["schema_version"], stored["payload"]) == (TOO_BIG - 1, TOO_BIG)


async def test_sql_text_is_stored_literally(client: RawClient) -> None:
    nasty = "x'); DROP TABLE goals; --"
    await client.call("goal.create", **goal(nasty, goal_text=nasty))
    assert (await client.call("goal.get", goal_id=nasty))["goal_text"] == nasty
    assert [g["goal_id"] for g in await client.call("goal.list")] == [nasty]


async def test_backup(client: RawClient, tmp_path: Path) -> None:
    await client.call("goal.create", **goal("g1"))
    dest = tmp_path / "copy.db"
    result = await client.call("db.backup", dest=str(dest))
    assert result == {"path": str(dest), "bytes": dest.stat().st_size}
    import sqlite3

    with sqlite3.connect(dest) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert copy.execute("SELECT goal_id FROM goals").fetchall() == [("g1",)]
    relative = await client.error("db.backup", dest="relative.db")
    assert relative["code"] == ErrorCode.INVALID_PARAMS
    status = await client.call("daemon.status")
    live = await client.error("db.backup", dest=status["db_path"])
    assert live["code"] == ErrorCode.INVALID_PARAMS
    for unusable in (str(tmp_path / "nul\0.db"), "/" + "a" * 5000):  # no such name can exist
        refused = await client.error("db.backup", dest=unusable)
        assert refused["code"] == ErrorCode.INVALID_PARAMS
        assert refused["data"]["field"] == "dest"


async def test_a_backup_that_cannot_be_written_is_no_failing_database(
    client: RawClient, caplog: pytest.LogCaptureFixture
) -> None:
    # Its destination's fault, answered -32030: not logged as the database's writes failing.
    refused = await client.error("db.backup", dest="/proc/no-such-place/copy.db")
    assert refused["code"] in (ErrorCode.INVALID_PARAMS, ErrorCode.STORAGE_FAILURE)
    refused = await client.error("db.backup", dest="/proc/copy.db")
    assert refused["code"] == ErrorCode.STORAGE_FAILURE
    assert "writes to the database" not in caplog.text


async def test_unknown_subscription(client: RawClient) -> None:
    error = await client.error("event.unsubscribe", subscription=999)
    assert error["code"] == ErrorCode.NOT_FOUND


def test_every_method_is_documented() -> None:
    protocol = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()
    missing = [name for name in METHODS if f"`{name}`" not in protocol]
    assert missing == []


def test_rpc_error_raised_for_errors() -> None:
    err = RpcError({"code": -32001, "message": "x"})
    assert err.code == -32001


async def test_the_daemon_checkpoints_the_wal_in_the_background(tmp_path: Path) -> None:
    with short_tempdir() as directory:
        # wal_autocheckpoint=0: no commit checkpoints by itself; only the worker does.
        overrides = {"checkpoint_interval": 0.02, "wal_autocheckpoint": 0}
        async with running_daemon(directory, **overrides) as daemon:
            client = await RawClient.connect(daemon.config.socket_path)
            await client.call("goal.create", **goal("g1"))
            events = [{"kind": "k", "payload": i} for i in range(200)]
            await client.call("event.append_batch", goal_id="g1", events=events)
            main_file = Path(daemon.config.db_path)
            with trio.fail_after(10):
                while _events_in_main_file(main_file, tmp_path) < 200:
                    await trio.sleep(0.02)
            await client.aclose()


def _events_in_main_file(path: Path, tmp_path: Path) -> int:
    """Events in the database file itself, without what its WAL holds."""
    copy = tmp_path / "main-file-only.db"
    copy.write_bytes(path.read_bytes())
    conn = sqlite3.connect(copy)
    try:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
    except sqlite3.DatabaseError:  # the schema itself is not checkpointed yet
        return 0
    finally:
        conn.close()


def _wal_restarts(path: Path) -> int:
    """The WAL header's checkpoint sequence number: SQLite adds 1 each time it starts the
    WAL over from its beginning (0 when there is no WAL yet)."""
    try:
        with path.open("rb") as wal:
            header = wal.read(16)
    except FileNotFoundError:
        return 0
    return int.from_bytes(header[12:16], "big") if len(header) == 16 else 0


async def test_the_wal_starts_over_while_writes_never_stop() -> None:
    with short_tempdir() as directory:
        overrides = {"checkpoint_interval": 0.02, "wal_autocheckpoint": 0, "wal_restart_pages": 64}
        async with running_daemon(directory, **overrides) as daemon:
            wal = Path(daemon.config.db_path + "-wal")
            cs = [await RawClient.connect(daemon.config.socket_path) for _ in range(4)]
            await cs[0].call("goal.create", **goal("g1"))
            stop = trio.Event()
            largest = 0

            async def writer(c: RawClient) -> None:
                while not stop.is_set():
                    await c.call("event.append", goal_id="g1", kind="k", payload="p" * 200)

            async with trio.open_nursery() as nursery:
                for c in cs:
                    nursery.start_soon(writer, c)
                first = _wal_restarts(wal)
                before = daemon.gate.commits
                for _ in range(30):
                    await trio.sleep(0.05)
                    largest = max(largest, wal.stat().st_size)
                stop.set()
            # Each COMMIT adds at least two pages to the WAL: growing, it would pass this.
            assert largest < (daemon.gate.commits - before) * 4096
            assert _wal_restarts(wal) > first
            for c in cs:
                await c.aclose()


async def test_a_bulk_call_runs_without_a_garbage_collection() -> None:
    # An append_batch of 10,000 events holds 40,000-50,000 objects until it ends: at
    # Python's own threshold (700 new objects) the collector ran dozens of times during it,
    # and one such call in three or four ended in a full collection of them all
    # (Config.gc_threshold).
    before = gc.get_threshold()
    with short_tempdir() as directory:
        async with running_daemon(directory) as daemon:
            assert gc.get_threshold() == (daemon.config.gc_threshold, *before[1:])
            client = await RawClient.connect(daemon.config.socket_path)
            await client.call("goal.create", **goal("g1"))
            payload = {"step": "edit", "files": ["a.py", "b.py"], "tokens": 1234, "ok": True}
            events = [{"kind": "step", "payload": payload} for _ in range(10_000)]
            collections: list[int] = []

            def note(phase: str, info: dict[str, int]) -> None:
                if phase == "start":
                    collections.append(info["generation"])

            gc.collect()
            gc.callbacks.append(note)
            try:
                result = await client.call("event.append_batch", goal_id="g1", events=events)
            finally:
                gc.callbacks.remove(note)
            assert len(result["event_ids"]) == 10_000
            assert collections == []
            await client.aclose()
    assert gc.get_threshold() == before  # as it was once the daemon stopped
