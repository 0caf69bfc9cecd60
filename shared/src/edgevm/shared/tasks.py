"""Tasks in the `edgevm_tasks` bucket: every write is also a `task.updated` event."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from edgevm.shared.clock import now
from edgevm.shared.errors import Conflict, NotFound, to_edgevm_error
from edgevm.shared.events import TaskUpdated
from edgevm.shared.ids import new_id
from edgevm.shared.metrics import TASK_DURATION, TASKS_ACTIVE, TASKS_FINISHED
from edgevm.shared.objects import Task
from edgevm.shared.publisher import EventPublisher

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Task)
FINAL = ("succeeded", "failed", "cancelled")
# The queued/running tasks this process wrote last, by (node, id): what the active gauge counts.
_active: dict[tuple[str, str], tuple[str, str]] = {}


def task_key(node: str, task_id: str) -> str:
    """Return the bucket key of a task: `<node>.<id>`, so nodes sharing a JetStream never collide."""
    return f"{node}.{task_id}"


def decode_task(data: bytes) -> Task:
    """Decode a task as stored in the bucket."""
    return _decoder.decode(data)


class TaskStore:
    """Creates and updates the tasks of one node; writes are revision-checked so two writers cannot race."""

    def __init__(self, kv: KeyValue, publisher: EventPublisher, node: str) -> None:
        self._kv = kv
        self._publisher = publisher
        self._node = node

    async def create(
        self, kind: str, vm: str | None = None, message: str = "queued", task_id: str | None = None
    ) -> tuple[Task, int]:
        """Write a new queued task (`task_id` when the caller made one); return it and its revision."""
        task = Task(
            id=task_id or new_id(), node=self._node, kind=kind, vm=vm, status="queued", created_at=now(),
            message=message,
        )
        revision = await self._kv.create(task_key(self._node, task.id), _encoder.encode(task))
        await self._publisher.publish(TaskUpdated(at=now(), task=task))
        _count_transition(task)
        return task, revision

    async def get(self, task_id: str) -> tuple[Task, int]:
        """Return a task and its revision, or raise NotFound."""
        try:
            entry = await self._kv.get(task_key(self._node, task_id))
        except KeyNotFoundError:
            raise NotFound(f"task {task_id} does not exist on node {self._node}", "id") from None
        assert entry.value is not None and entry.revision is not None
        return decode_task(entry.value), entry.revision

    async def update(self, task: Task, revision: int, **changes: Any) -> tuple[Task, int]:
        """Apply `changes` if the stored task is still at `revision`; stamp started/finished times."""
        changes.setdefault("finished_at", task.finished_at)
        status = changes.get("status", task.status)
        if status == "running" and task.started_at is None:
            changes["started_at"] = now()
        if status in FINAL and task.finished_at is None:
            changes["finished_at"] = now()
            if status == "succeeded":
                changes.setdefault("progress", 100)
        updated = msgspec.structs.replace(task, **changes)
        try:
            revision = await self._kv.update(task_key(self._node, task.id), _encoder.encode(updated), last=revision)
        except KeyWrongLastSequenceError:
            current, _ = await self.get(task.id)
            raise Conflict(f"task {task.id} changed meanwhile (now {current.status})", "id") from None
        # The event goes out after the write succeeded: a subscriber never sees a status the bucket lacks.
        await self._publisher.publish(TaskUpdated(at=now(), task=updated))
        if updated.status != task.status:
            _count_transition(updated)
        return updated, revision


def _count_transition(task: Task) -> None:
    """Move `task` to its new status in the task metrics (a task first seen here may have started elsewhere)."""
    key = (task.node, task.id)
    before = _active.pop(key, None)
    if before is not None:
        TASKS_ACTIVE.labels(task.node, *before).dec()
    if task.status in FINAL:
        TASKS_FINISHED.labels(task.node, task.vm or "", task.kind, task.status).inc()
        if task.finished_at is not None:
            TASK_DURATION.labels(task.node, task.kind).observe(max(0.0, _seconds(task.created_at, task.finished_at)))
    else:
        if before is None:
            # Its outcome series start at 0 before it ends, so that increase() and rate() see its end.
            for outcome in FINAL:
                TASKS_FINISHED.labels(task.node, task.vm or "", task.kind, outcome)
        _active[key] = (task.kind, task.status)
        TASKS_ACTIVE.labels(task.node, task.kind, task.status).inc()


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def failure_text(exc: BaseException, service: str) -> str:
    """Why a task of `service` failed, as a whole sentence without Python internals; never empty."""
    error = to_edgevm_error(exc)
    if error is not None:
        text = error.message
    elif isinstance(exc, OSError | ValueError):
        text = str(exc)
    else:
        log.error("%s task failed unexpectedly", service, exc_info=exc)
        return f"internal error ({type(exc).__name__}); the {service} log has the details"
    if text.strip():
        return text
    summary = (type(exc).__doc__ or "").strip().splitlines()
    return f"{type(exc).__name__}: {summary[0]}" if summary else f"{type(exc).__name__} (no details)"
