"""Tasks in the `edgevm_tasks` bucket: every write is also a `task.updated` event."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from edgevm.shared.clock import now
from edgevm.shared.errors import Conflict, NotFound, to_edgevm_error
from edgevm.shared.events import TaskUpdated
from edgevm.shared.ids import new_id
from edgevm.shared.objects import Task
from edgevm.shared.publisher import EventPublisher

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Task)


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
        if status in ("succeeded", "failed", "cancelled") and task.finished_at is None:
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
        return updated, revision


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
