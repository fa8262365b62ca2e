"""Transactions, threads and online backup."""

from __future__ import annotations

import fcntl
import gc
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest

from omkd.db import (
    Busy,
    Conflict,
    Database,
    DatabaseClosed,
    DbError,
    EventInput,
    GoalNotFound,
    GoalRecord,
    Interrupted,
    InvalidData,
    StorageFailure,
    TaskRecord,
    TimeLimitExceeded,
    Transaction,
    TransactionClosed,
    backup_database,
    check_database,
)
from omkd.db.database import _DatabaseScope
from omkd.db.maintenance import _TEMPORARY_BACKUP, remove_stale_backups, temporary_backup

MakeGoal = Callable[..., GoalRecord]
WAIT = 10.0  # seconds; only reached when a test is about to fail


def test_commit_makes_writes_visible(db: Database, make_goal: MakeGoal) -> None:
    tx = db.transaction()
    assert tx.active and db.transaction_active
    tx.goals.create(make_goal("g1"))
    tx.events.append("g1", "k", 1)
    assert tx.goals.get("g1") is not None  # the transaction sees its own writes
    assert db.goals.get("g1") is None  # others do not, and do not wait
    assert db.events.get_by_goal("g1") == []
    tx.commit()
    assert not tx.active and not db.transaction_active
    assert db.goals.get("g1") is not None
    assert len(db.events.get_by_goal("g1")) == 1


def test_rollback_discards_writes(db: Database, make_goal: MakeGoal) -> None:
    db.goals.create(make_goal("g1"))
    tx = db.transaction()
    tx.events.append("g1", "k", 1)
    tx.goals.update_status("g1", "x", "y")
    tx.rollback()
    assert db.events.get_by_goal("g1") == []
    assert db.goals.get("g1").version == 1  # type: ignore[union-attr]
    db.events.append("g1", "after", 2)  # the write lock was released


def test_context_manager_commits_or_rolls_back(db: Database, make_goal: MakeGoal) -> None:
    with db.transaction() as tx:
        tx.goals.create(make_goal("kept"))
    with pytest.raises(RuntimeError), db.transaction() as tx:
        tx.goals.create(make_goal("dropped"))
        raise RuntimeError("boom")
    assert db.goals.get("kept") is not None
    assert db.goals.get("dropped") is None
    assert not tx.active


def test_closed_transaction_refuses_use(db: Database, make_goal: MakeGoal) -> None:
    tx = db.transaction()
    tx.commit()
    with pytest.raises(TransactionClosed):
        tx.goals.create(make_goal())
    with pytest.raises(TransactionClosed):
        tx.goals.get("g1")
    with pytest.raises(TransactionClosed):
        tx.commit()
    with pytest.raises(TransactionClosed):
        tx.rollback()
    tx2 = db.transaction()
    tx2.rollback()
    with pytest.raises(TransactionClosed):
        tx2.events.append("g1", "k", 1)


@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_an_ended_transaction_is_freed_at_once(db: Database, make_goal: MakeGoal, end: str) -> None:
    # The daemon ends a transaction with every group commit: one kept alive by a reference
    # cycle would wait for the garbage collector. Its repositories refuse use all the same.
    gc.disable()
    try:
        tx = db.transaction()
        events = tx.events  # taken before the end
        tx.goals.create(make_goal("g1"))
        events.append("g1", "k", 1)
        getattr(tx, end)()
        with pytest.raises(TransactionClosed):
            events.append("g1", "k", 2)
        with pytest.raises(TransactionClosed):
            tx.events.append("g1", "k", 3)
        with pytest.raises(TransactionClosed):
            tx.goals.get("g1")
        ended = weakref.ref(tx)
        del tx, events
        assert ended() is None
    finally:
        gc.enable()
    assert len(db.events.get_by_goal("g1")) == (1 if end == "commit" else 0)


def test_failing_call_changes_nothing_and_keeps_the_transaction(
    db: Database, make_goal: MakeGoal
) -> None:
    tx = db.transaction()
    tx.goals.create(make_goal("g1"))
    tx.tasks.create_batch("g1", [TaskRecord(task_id="t0", goal_id="g1", kind="k")])
    batch = [TaskRecord(task_id=f"t{i}", goal_id="g1", kind="k") for i in (1, 2, 0)]
    with pytest.raises(Conflict):
        tx.tasks.create_batch("g1", batch)
    with pytest.raises(Conflict):
        tx.goals.create(make_goal("g1"))
    with pytest.raises(GoalNotFound):
        tx.events.append("missing", "k", 1)
    with pytest.raises(InvalidData):
        tx.events.append_batch("g1", [EventInput(kind="k", payload=object())])
    assert tx.active
    assert [t.task_id for t in tx.tasks.get_by_goal("g1")] == ["t0"]
    tx.events.append("g1", "k", 1)
    tx.commit()
    assert [t.task_id for t in db.tasks.get_by_goal("g1")] == ["t0"]
    assert len(db.events.get_by_goal("g1")) == 1


def test_failing_lone_append_leaves_nothing_and_frees_the_lock(
    db: Database, make_goal: MakeGoal
) -> None:
    # An append outside a transaction is one statement in SQLite's own transaction.
    db.goals.create(make_goal("g1"))
    with pytest.raises(GoalNotFound):
        db.events.append("missing", "k", 1)
    with pytest.raises(InvalidData):
        db.events.append("g1", "k", object())
    assert db.events.get_by_goal("g1") == []
    assert not db.transaction_active
    with db.transaction(timeout=0.05) as tx:  # the write lock is free
        tx.events.append("g1", "k", 1)
    assert db.events.append("g1", "k", 2).event_id == 2
    assert [e.payload for e in db.events.get_by_goal("g1")] == [1, 2]


def test_transaction_spans_threads(db: Database, make_goal: MakeGoal) -> None:
    tx = db.transaction()
    tx.goals.create(make_goal("g1"))

    def more() -> None:
        tx.events.append("g1", "from another thread", 1)
        tx.commit()

    worker = threading.Thread(target=more)
    worker.start()
    worker.join(WAIT)
    assert not tx.active
    assert len(db.events.get_by_goal("g1")) == 1


def test_writers_wait_for_an_open_transaction(db: Database, make_goal: MakeGoal) -> None:
    db.goals.create(make_goal("g1"))
    tx = db.transaction()
    tx.events.append("g1", "in tx", 1)
    done = threading.Event()

    def writer() -> None:
        db.events.append("g1", "outside", 2)
        done.set()

    worker = threading.Thread(target=writer)
    worker.start()
    assert not done.wait(0.2)  # blocked on the write lock
    with pytest.raises(Busy):
        db.transaction(timeout=0.05)
    tx.commit()
    assert done.wait(WAIT)
    worker.join(WAIT)
    assert [e.kind for e in db.events.get_by_goal("g1")] == ["in tx", "outside"]


def test_a_thread_writing_past_its_own_open_transaction_gets_busy_not_a_hang(
    db: Database, make_goal: MakeGoal
) -> None:
    db.goals.create(make_goal("g1"))  # no lock_timeout: it would wait for itself forever
    tx = db.transaction()
    for call in (
        lambda: db.events.append("g1", "k", 1),
        db.transaction,
        lambda: db.checkpoint("PASSIVE"),
    ):
        with pytest.raises(Busy, match="this thread holds the write lock already"):
            call()
    tx.events.append("g1", "k", 2)  # the transaction itself goes on
    tx.commit()
    db.events.append("g1", "k", 3)
    assert [e.payload for e in db.events.get_by_goal("g1")] == [2, 3]


def test_lock_timeout_raises_busy(db_path: Path, make_goal: MakeGoal) -> None:
    with Database.open(db_path, lock_timeout=0.05) as db:
        db.goals.create(make_goal("g1"))
        tx = db.transaction()
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                db.events.append("g1", "k", 1)
            except Busy as exc:
                errors.append(exc)

        worker = threading.Thread(target=writer)
        worker.start()
        worker.join(WAIT)
        tx.rollback()
        assert len(errors) == 1


def test_reads_from_another_thread_do_not_wait_for_a_transaction(
    db: Database, make_goal: MakeGoal
) -> None:
    db.goals.create(make_goal("g1"))
    tx = db.transaction()
    tx.goals.update_status("g1", "changed", "p")
    seen: list[str] = []

    def reader() -> None:
        goal = db.goals.get("g1")
        assert goal is not None
        seen.append(goal.status)

    worker = threading.Thread(target=reader)
    worker.start()
    worker.join(WAIT)
    assert not worker.is_alive()
    assert seen == ["running"]
    tx.commit()
    assert db.goals.get("g1").status == "changed"  # type: ignore[union-attr]


def _hold_a_read(db: Database) -> tuple[threading.Event, threading.Thread]:
    """A thread in the middle of a read on ``db`` until the returned event is set (the
    repositories' own reads end at once: this holds the read scope they use)."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with _DatabaseScope(db).read() as conn:
            conn.scalar("SELECT count(*) FROM goals")
            entered.set()
            release.wait(WAIT)

    holder = threading.Thread(target=hold)
    holder.start()
    assert entered.wait(WAIT)
    return release, holder


def test_a_read_does_not_wait_for_another_threads_read(db: Database, make_goal: MakeGoal) -> None:
    # The daemon runs a long read (a page of 100,000 events) in a worker thread: the event
    # loop's quick reads must not queue behind it.
    db.goals.create(make_goal("g1"))
    release, holder = _hold_a_read(db)
    try:
        seen: list[str] = []
        worker = threading.Thread(target=lambda: seen.append(db.goals.get("g1").status))  # type: ignore[union-attr]
        worker.start()
        worker.join(WAIT)
        assert seen == ["running"]
        db.goals.create(make_goal("g2"))  # a spare reader sees the latest commit too
        assert {g.goal_id for g in db.goals.list()} == {"g1", "g2"}
    finally:
        release.set()
        holder.join(WAIT)
    spare = db._spare_readers[-1]
    db.close()
    assert db._spare_readers == []
    with pytest.raises(sqlite3.ProgrammingError):  # closed with the Database
        spare.raw.execute("SELECT 1")


def test_a_read_inside_a_read_of_the_same_thread(db: Database, make_goal: MakeGoal) -> None:
    db.goals.create(make_goal("g1"))
    with _DatabaseScope(db).read():
        assert db.goals.get("g1") is not None  # on a spare: this thread holds the reader
        assert db._read_lock.locked()
    assert not db._read_lock.locked()  # each read let go of its own connection
    release, holder = _hold_a_read(db)  # another thread holds the reader: two spares
    try:
        with _DatabaseScope(db).read():
            assert db.goals.get("g1") is not None
        assert len(db._spare_readers) == 2
    finally:
        release.set()
        holder.join(WAIT)
    assert not db._read_lock.locked()


ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c"


@pytest.mark.parametrize("on_a_spare", [False, True])
def test_interrupt_reads_ends_the_reads_running_in_other_threads(
    db: Database, on_a_spare: bool
) -> None:
    # The daemon, stopping, interrupts its long reads rather than wait for their end.
    errors: list[BaseException] = []

    def endless_read() -> None:
        try:
            with _DatabaseScope(db).read() as conn:
                conn.scalar(ENDLESS)
        except DbError as exc:
            errors.append(exc)

    release, holder = _hold_a_read(db) if on_a_spare else (None, None)
    reader = threading.Thread(target=endless_read)
    reader.start()
    deadline = time.monotonic() + WAIT
    while reader.is_alive() and time.monotonic() < deadline:
        db.interrupt_reads()  # (until the statement has begun: before, it is a no-op)
        reader.join(0.01)
    assert not reader.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], Interrupted)
    if release is not None and holder is not None:
        assert len(db._spares_in_use) == 0  # the endless read's spare came back
        release.set()
        holder.join(WAIT)
    assert db.goals.list() == []  # reads begun afterwards run


def test_a_read_past_its_time_limit_stops_and_the_next_runs_whole(db: Database) -> None:
    # The daemon's event loop reads under a limit, and runs a read that passes it in a thread.
    with db.time_limit(0.05):
        started = time.monotonic()
        with pytest.raises(TimeLimitExceeded) as stopped, _DatabaseScope(db).read() as conn:
            conn.scalar(ENDLESS)
        assert time.monotonic() - started < WAIT
        assert stopped.value.data == {"seconds": 0.05}
        assert db.goals.list() == []  # the limit is each read's, not the block's
    # Outside the block no limit is left on the connection: a read of 0.1 s runs to its end.
    with _DatabaseScope(db).read() as conn:
        assert conn.scalar(ENDLESS.replace("FROM c)", "FROM c WHERE x < 300000)")) == 300_000


def test_a_time_limit_is_its_threads_and_its_blocks(db: Database) -> None:
    outcomes: list[object] = []

    def endless_read() -> None:
        try:
            with _DatabaseScope(db).read() as conn:
                conn.scalar(ENDLESS)
        except DbError as exc:
            outcomes.append(exc)

    with db.time_limit(0.01):
        with db.time_limit(60):  # an inner block's limit, then the outer's again
            assert db.goals.list() == []
        with pytest.raises(TimeLimitExceeded), _DatabaseScope(db).read() as conn:
            conn.scalar(ENDLESS)
        other = threading.Thread(target=endless_read)  # no limit in another thread
        other.start()
        other.join(0.5)
        assert other.is_alive()
    db.interrupt_reads()
    other.join(WAIT)
    assert len(outcomes) == 1 and type(outcomes[0]) is Interrupted


def test_an_interrupted_read_under_a_time_limit_is_interrupted(db: Database) -> None:
    # Stopping the daemon interrupts the reads; one under a limit not passed says so.
    timer = threading.Timer(0.2, db.interrupt_reads)
    timer.start()
    with db.time_limit(60), pytest.raises(Interrupted), _DatabaseScope(db).read() as conn:
        conn.scalar(ENDLESS)
    timer.join()


def test_a_second_handle_reads_while_a_transaction_is_open(
    db_path: Path, make_goal: MakeGoal
) -> None:
    with Database.open(db_path) as first, Database.open(db_path) as second:
        first.goals.create(make_goal("g1"))
        tx = first.transaction()
        tx.events.append("g1", "k", 1)
        assert second.goals.get("g1") is not None
        assert second.events.get_by_goal("g1") == []
        tx.commit()
        assert len(second.events.get_by_goal("g1")) == 1


def test_another_process_holding_the_lock_is_busy(db_path: Path, make_goal: MakeGoal) -> None:
    with Database.open(db_path, busy_timeout_ms=50) as db:
        other = sqlite3.connect(db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(Busy):
                db.goals.create(make_goal("g1"))
            with pytest.raises(Busy):
                db.transaction()
        finally:
            other.execute("ROLLBACK")
            other.close()
        db.goals.create(make_goal("g1"))


def test_ten_threads_ten_appends_each(db: Database, make_goal: MakeGoal) -> None:
    db.goals.create(make_goal("g1"))
    start = threading.Barrier(10)
    ids: list[int] = []
    lock = threading.Lock()

    def appender(n: int) -> None:
        start.wait(WAIT)
        for i in range(10):
            event = db.events.append("g1", "k", {"thread": n, "i": i})
            with lock:
                ids.append(event.event_id)

    threads = [threading.Thread(target=appender, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    stored = db.events.get_by_goal("g1")
    assert len(stored) == 100 and len(set(ids)) == 100
    assert [e.event_id for e in stored] == sorted(ids)
    for n in range(10):
        mine = [e.payload["i"] for e in stored if e.payload["thread"] == n]
        assert mine == list(range(10))


def test_concurrent_transactions_are_serialized(db: Database, make_goal: MakeGoal) -> None:
    db.goals.create(make_goal("g1"))

    def bump() -> None:
        for _ in range(10):
            with db.transaction() as tx:
                goal = tx.goals.get("g1")
                assert goal is not None
                tx.goals.update("g1", goal.version, {"max_agents": goal.version})

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert db.goals.get("g1").version == 41  # type: ignore[union-attr]


def test_a_later_thread_with_a_reused_ident_waits_for_the_lock_like_any_other(
    db: Database, make_goal: MakeGoal
) -> None:
    # A Transaction begun in a thread that then ended: a new thread may get the same ident,
    # and was told at once that it held the write lock itself (Busy) instead of waiting.
    db.goals.create(make_goal("g1"))
    box: dict[str, object] = {}

    def begin() -> None:
        box["tx"], box["ident"] = db.transaction(), threading.get_ident()

    def write() -> None:
        box["same ident"] = threading.get_ident() == box["ident"]
        try:
            box["result"] = db.events.append("g1", "k", 1).event_id
        except Exception as exc:
            box["result"] = exc

    for _ in range(20):  # until the ident is reused (at once, on Linux)
        thread = threading.Thread(target=begin)
        thread.start()
        thread.join()
        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(0.05)
        assert writer.is_alive()  # waiting for the lock
        tx = box["tx"]
        assert isinstance(tx, Transaction)
        tx.commit()
        writer.join(5)
        assert isinstance(box["result"], int), box["result"]
        if box["same ident"]:
            break
    assert box["same ident"]


def test_total_changes_after_close_is_database_closed(db_path: Path) -> None:
    db = Database.open(db_path)
    db.close()
    with pytest.raises(DatabaseClosed):
        db.total_changes  # noqa: B018


def test_backup_and_restore(db: Database, make_goal: MakeGoal, tmp_path: Path) -> None:
    stored = db.goals.create(make_goal("g1", failure={"deep": [1, {"x": 2**70}]}))
    db.events.append_batch("g1", [EventInput(kind="k", payload=i) for i in range(50)])
    dest = tmp_path / "backups" / "copy.db"
    dest.parent.mkdir()
    written = db.backup_to(dest)
    assert written == dest.stat().st_size > 0
    assert check_database(dest) == []
    assert list(dest.parent.iterdir()) == [dest]  # no temporary file left
    db.goals.delete("g1")
    with Database.open(dest) as restored:
        assert restored.goals.get("g1") == stored  # (a new make_goal may be a second later)
        assert [e.payload for e in restored.events.get_by_goal("g1")] == list(range(50))
    # Backing up again replaces the file.
    db.backup_to(str(dest))
    with Database.open(dest) as restored:
        assert restored.goals.get("g1") is None


def test_backup_while_another_thread_keeps_writing(
    db: Database, make_goal: MakeGoal, tmp_path: Path
) -> None:
    db.goals.create(make_goal("g1"))
    stop = threading.Event()
    written: list[int] = []

    def writer() -> None:
        while not stop.is_set():
            written.append(db.events.append("g1", "k", "x" * 200).event_id)

    worker = threading.Thread(target=writer)
    worker.start()
    try:
        while len(written) < 200:
            threading.Event().wait(0.005)
        sizes = [db.backup_to(tmp_path / f"b{i}.db") for i in range(3)]
    finally:
        stop.set()
        worker.join(WAIT)
    assert all(size > 0 for size in sizes)
    for i in range(3):
        assert check_database(tmp_path / f"b{i}.db") == []
    with Database.open(tmp_path / "b2.db") as copy:
        copied = copy.events.get_by_goal("g1")
    assert len(copied) >= 200
    assert [e.event_id for e in copied] == written[: len(copied)]


def test_backup_refuses_bad_destinations(db: Database, tmp_path: Path) -> None:
    live = db.path
    for dest in (
        "relative.db",
        live,
        str(live) + "-wal",
        Path(str(live) + "-shm"),
        tmp_path,
        tmp_path / "missing-dir" / "x.db",
        str(tmp_path / "nul\0.db"),
        tmp_path / ("n" * 256),  # longer than a file name may be
        tmp_path / ("n" * 256) / "x.db",
    ):
        with pytest.raises(InvalidData) as info:
            db.backup_to(dest)
        assert info.value.data["field"] == "dest"
    link = tmp_path / "link.db"
    link.symlink_to(live)
    hard_link = tmp_path / "hard-link.db"
    hard_link.hardlink_to(live)
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(tmp_path / "s"))
    locked = tmp_path / "held.lock"
    fd = os.open(locked, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for dest in (link, hard_link, tmp_path / "s", locked):
            with pytest.raises(InvalidData):
                db.backup_to(dest)
        assert os.fstat(fd).st_size == 0 and os.stat(locked).st_ino == os.fstat(fd).st_ino
    finally:
        os.close(fd)
        listening.close()
    assert db.backup_to(locked) > 0  # nobody holds it now: an ordinary file to replace


def test_backup_refuses_a_destination_with_a_wal_or_journal_beside_it(
    db: Database, make_goal: MakeGoal, tmp_path: Path
) -> None:
    """An earlier copy opened by another program leaves dest-wal: SQLite would apply it to
    the new copy when opening it, and the backup would read as the old data."""
    db.goals.create(make_goal("live"))
    dest = tmp_path / "copy.db"
    db.backup_to(dest)
    with Database.open(dest) as other:  # another program writes to the earlier copy ...
        other.goals.create(make_goal("stale"))
        other.goals.delete("live")
        kept = sqlite3.connect(dest)  # ... and is still running: its -wal stays
        try:
            kept.execute("SELECT count(*) FROM goals").fetchone()
            assert (tmp_path / "copy.db-wal").exists()
            with pytest.raises(InvalidData, match=r"copy\.db-wal exists") as info:
                db.backup_to(dest)
            assert info.value.data["field"] == "dest"
        finally:
            kept.close()
    with Database.open(dest) as other:  # untouched: the other program's data
        assert [g.goal_id for g in other.goals.list()] == ["stale"]
    journal = tmp_path / "other.db-journal"
    journal.write_bytes(b"hot")  # no other.db: a journal left alone is refused all the same
    with pytest.raises(InvalidData, match=r"other\.db-journal exists"):
        db.backup_to(tmp_path / "other.db")
    journal.unlink()
    assert db.backup_to(tmp_path / "other.db") > 0
    with Database.open(tmp_path / "other.db") as copy:
        assert [g.goal_id for g in copy.goals.list()] == ["live"]


def test_backup_to_a_file_name_of_the_longest_length(
    db: Database, make_goal: MakeGoal, tmp_path: Path
) -> None:
    db.goals.create(make_goal("g1"))
    backups = tmp_path / "backups"
    backups.mkdir()
    dest = backups / ("n" * os.pathconf(backups, "PC_NAME_MAX"))
    assert db.backup_to(dest) == dest.stat().st_size
    assert [p.name for p in backups.iterdir()] == [dest.name]  # no temporary file left
    # (SQLite itself cannot open it there: its -journal's name would be too long.)
    with Database.open(dest.rename(backups / "copy.db")) as copy:
        assert copy.goals.get("g1") is not None


_DIE_MID_WRITE = """
import os, sys
from omkd.db import Database, GoalRecord
db = Database.open(sys.argv[1])
db.goals.create(GoalRecord(goal_id="g1", status="s", phase="p", goal_text="t", project_dir="/p"))
os._exit(0)  # no close, no checkpoint: the goal is only in the -wal
"""


def test_backup_database_copies_a_hot_wal_and_writes_nothing(tmp_path: Path) -> None:
    source = tmp_path / "omk.db"
    subprocess.run([sys.executable, "-c", _DIE_MID_WRITE, str(source)], check=True, timeout=60)
    wal = Path(f"{source}-wal")
    before = (source.read_bytes(), wal.read_bytes())
    dest = tmp_path / "copy.db"
    assert backup_database(source, dest) == dest.stat().st_size
    assert (source.read_bytes(), wal.read_bytes()) == before  # not checkpointed, not migrated
    with sqlite3.connect(dest) as conn:
        assert conn.execute("SELECT goal_id FROM goals").fetchall() == [("g1",)]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    conn.close()


def test_a_backup_removes_what_a_killed_backup_left_and_nothing_else(
    db: Database, tmp_path: Path
) -> None:
    backups = tmp_path / "backups"
    backups.mkdir()
    names = {
        "stale": f".omkd-backup.{'a' * 32}.tmp",
        "stale journal": f".omkd-backup.{'a' * 32}.tmp-journal",
        "journal alone": f".omkd-backup.{'d' * 32}.tmp-journal",
        "in progress": f".omkd-backup.{'b' * 32}.tmp",
        "someone else's": ".omkd-backup.notours.tmp",
        "older omkd's": f".omkd-backup-{'c' * 32}.tmp",
    }
    for name in names.values():
        (backups / name).write_bytes(b"partial")
    # Another process writes the one in progress: it holds its lock (any pid namespace).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         "f = open(sys.argv[1], 'rb'); fcntl.flock(f, fcntl.LOCK_EX); print(flush=True)\n"
         "time.sleep(60)", str(backups / names["in progress"])],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"\n"
        db.backup_to(backups / "copy.db")
        left = {p.name for p in backups.iterdir()}
        gone = {names["stale"], names["stale journal"], names["journal alone"]}
        assert left == {"copy.db", *names.values()} - gone
        assert stat.S_IMODE((backups / "copy.db").stat().st_mode) == 0o600
    finally:
        holder.kill()
        holder.communicate()
    with temporary_backup(backups / "x.db") as temporary:
        assert _TEMPORARY_BACKUP.fullmatch(temporary.name)
        assert temporary not in remove_stale_backups(backups)  # locked while it is written
    assert not temporary.exists() or temporary.stat().st_size == 0


def test_backup_database_of_a_missing_file_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(StorageFailure, match="no database at"):
        backup_database(tmp_path / "state" / "omk.db", tmp_path / "copy.db")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_truncates_the_wal(db: Database, make_goal: MakeGoal) -> None:
    db.goals.create(make_goal("g1"))
    db.events.append_batch("g1", [EventInput(kind="k", payload=i) for i in range(100)])
    busy, _, _ = db.checkpoint()
    assert busy == 0
    assert Path(str(db.path) + "-wal").stat().st_size == 0
    with pytest.raises(InvalidData):
        db.checkpoint("SOMETIMES")


def test_close_rolls_back_an_open_transaction(db_path: Path, make_goal: MakeGoal) -> None:
    db = Database.open(db_path)
    tx = db.transaction()
    tx.goals.create(make_goal("g1"))
    db.close()
    assert not tx.active
    with Database.open(db_path) as again:
        assert again.goals.get("g1") is None


def _rows_in_main_file(path: Path, table: str, tmp_path: Path) -> int:
    """Rows of ``table`` in the database file itself, without what its WAL holds."""
    copy = tmp_path / "main-file-only.db"
    copy.write_bytes(path.read_bytes())
    conn = sqlite3.connect(copy)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()
        copy.unlink()


def test_checkpoint_concurrently_while_another_thread_writes(
    tmp_path: Path, make_goal: MakeGoal
) -> None:
    path = tmp_path / "t.db"
    with Database.open(path, wal_autocheckpoint=0) as db:
        assert _pragma_of(db, "wal_autocheckpoint") == 0
        db.goals.create(make_goal("g1"))
        db.checkpoint("TRUNCATE")  # the schema and the goal in the file itself
        before = db.total_changes
        db.events.append_batch("g1", [EventInput(kind="k", payload=i) for i in range(300)])
        assert db.total_changes == before + 300
        assert _rows_in_main_file(path, "events", tmp_path) == 0  # all still in the WAL
        stop = threading.Event()

        def writer() -> None:
            while not stop.is_set():
                db.events.append("g1", "more", None)

        worker = threading.Thread(target=writer)
        worker.start()
        try:
            busy, log, done = db.checkpoint_concurrently()
            assert done <= log
        finally:
            stop.set()
            worker.join(WAIT)
        assert busy == 0 and done > 0  # it copied frames while the other thread wrote
        busy, log, done = db.checkpoint_concurrently()  # nothing writes now: all of the WAL
        assert busy == 0 and done == log
        stored = len(db.events.get_by_goal("g1", limit=100_000))
        assert stored > 300
        assert _rows_in_main_file(path, "events", tmp_path) == stored
    with pytest.raises(DatabaseClosed):
        db.checkpoint_concurrently()
    assert check_database(path) == []


def test_wal_autocheckpoint_must_not_be_negative(tmp_path: Path) -> None:
    with pytest.raises(InvalidData):
        Database.open(tmp_path / "t.db", wal_autocheckpoint=-1)
    with Database.open(tmp_path / "t.db") as db:
        assert _pragma_of(db, "wal_autocheckpoint") == 1000  # SQLite's own default


def test_wal_size_limit_cuts_the_wal_back_when_it_starts_over(
    tmp_path: Path, make_goal: MakeGoal
) -> None:
    path = tmp_path / "t.db"
    wal = Path(f"{path}-wal")
    with pytest.raises(InvalidData):
        Database.open(path, wal_size_limit=-1)
    with Database.open(path, wal_autocheckpoint=0, wal_size_limit=16) as db:
        assert _pragma_of(db, "journal_size_limit") == 16 * 4096  # pages of 4 KiB
        db.goals.create(make_goal("g1"))
        events = [EventInput(kind="k", payload="p" * 1000) for _ in range(2000)]
        db.events.append_batch("g1", events)
        grown = wal.stat().st_size
        assert grown > 64 * 4096  # about 2 MB of events in the WAL
        busy, log, done = db.checkpoint_concurrently()
        assert busy == 0 and done == log
        db.events.append("g1", "k", None)  # every frame checkpointed: the WAL starts over
        assert wal.stat().st_size <= 16 * 4096 + 2 * 4120  # cut back, then one commit
    with Database.open(path) as db:
        assert _pragma_of(db, "journal_size_limit") == -1  # SQLite's default: never cut


def _pragma_of(db: Database, name: str) -> object:
    return db._writer.raw.execute(f"PRAGMA {name}").fetchone()[0]
