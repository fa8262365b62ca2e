"""What the scenarios write: the same payloads and tasks for omkd and for direct SQLite."""

from __future__ import annotations

from typing import Any, Final

# The size of a typical agent step event (the one bench/db_bench.py uses).
PAYLOAD: Final = {"step": "edit", "files": ["a.py", "b.py"], "tokens": 1234, "ok": True}
# Events of the large log carry more text, so that 1,000,000 of them make ~500 MB.
LARGE_PAYLOAD_TEXT_BYTES: Final = 400
KIND: Final = "step"


def large_payload(index: int) -> dict[str, Any]:
    return {"step": index, "text": "x" * LARGE_PAYLOAD_TEXT_BYTES, "ok": True}


def event_items(count: int) -> list[dict[str, Any]]:
    """The ``events`` param of event.append_batch."""
    return [{"kind": KIND, "payload": PAYLOAD} for _ in range(count)]


def tasks(count: int, goal_id: str) -> list[dict[str, Any]]:
    """A task graph: a chain where each task depends on the one before."""
    return [
        {
            "task_id": f"{goal_id}-t{i}",
            "kind": "code",
            "title": f"task {i}",
            "description": "do the thing",
            "read_set": ["src/a.py"],
            "write_set": [f"src/m{i}.py"],
            "depends_on": [f"{goal_id}-t{i - 1}"] if i else [],
            "created_at": 1_700_000_000,
            "updated_at": 1_700_000_000,
        }
        for i in range(count)
    ]
