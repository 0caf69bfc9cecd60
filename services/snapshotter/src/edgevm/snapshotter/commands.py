"""snapshot.* commands: checked at once, then queued as tasks for the workers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated

from msgspec import Meta

from edgevm.shared.commands import SnapshotCreate, SnapshotList, SnapshotListRequest, SnapshotRef, TaskReply
from edgevm.shared.errors import Conflict, NotFound
from edgevm.shared.ids import new_id
from edgevm.shared.objects import Task
from edgevm.shared.records import VmRecordReader
from edgevm.shared.tasks import TaskStore
from edgevm.snapshotter.dedupe import RequestIds
from edgevm.snapshotter.leases import TaskLeases
from edgevm.snapshotter.operations import SnapshotOperations, to_snapshot
from edgevm.snapshotter.workqueue import WorkItem, WorkQueue

log = logging.getLogger(__name__)
# A client's id of one request: sent again with the same id (a retry after a lost reply), it gets the
# same task instead of a second one.
RequestId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}\Z")]
COMPENSATION_DEADLINE = 2.0  # for undoing a submit that failed half-way


class CreateRequest(SnapshotCreate):
    """snapshot.create as the snapshotter takes it: the protocol's request and an optional request id."""

    request_id: RequestId | None = None


class RefRequest(SnapshotRef):
    """snapshot.restore and snapshot.delete as the snapshotter takes them, with an optional request id."""

    request_id: RequestId | None = None


class SnapshotCommands:
    """The snapshot commands of one node."""

    def __init__(self, records: VmRecordReader, operations: SnapshotOperations, store: TaskStore,
                 leases: TaskLeases, queue: WorkQueue, request_ids: RequestIds | None = None) -> None:
        self._records = records
        self._ops = operations
        self._store = store
        self._leases = leases
        self._queue = queue
        self._request_ids = request_ids

    async def create(self, req: CreateRequest) -> TaskReply:
        """Queue a snapshot.create task; the mode follows the VM's firmware (bios internal, uefi external)."""

        async def check() -> None:
            await self._records.get(req.vm)
            await self._ops.root_disk(req.vm)  # 422 for a VM without a disk of its own
            if await self._ops.snapshots.get(req.vm, req.name) is not None:
                raise Conflict(f"VM {req.vm} has a snapshot named {req.name} already", "name")

        return TaskReply(await self._submit("snapshot.create", req, check, req.description))

    async def restore(self, req: RefRequest) -> TaskReply:
        """Queue a snapshot.restore task: the VM goes back to the snapshot, losing what was written since."""
        return TaskReply(await self._submit("snapshot.restore", req, lambda: self._known(req)))

    async def delete(self, req: RefRequest) -> TaskReply:
        """Queue a snapshot.delete task: the snapshot goes, its children get its parent."""
        return TaskReply(await self._submit("snapshot.delete", req, lambda: self._known(req)))

    async def list(self, req: SnapshotListRequest) -> SnapshotList:
        """snapshot.list: every snapshot with its parent, oldest first; `current` marks where the VM is."""
        await self._records.get(req.vm)
        return SnapshotList([to_snapshot(req.vm, info) for info in await self._ops.snapshots.list(req.vm)])

    async def _known(self, req: SnapshotRef) -> None:
        await self._records.get(req.vm)
        if await self._ops.snapshots.get(req.vm, req.name) is None:
            raise NotFound(f"VM {req.vm} has no snapshot named {req.name}", "name")

    async def _submit(self, kind: str, req: CreateRequest | RefRequest, check: Callable[[], Awaitable[None]],
                      description: str = "") -> Task:
        """Check the request, lease the VM (409 names the task holding it), check again under the lease (a
        task that held the VM meanwhile may have changed its snapshots), write the queued task and queue its
        work item. A request id sent before answers the task it started, whatever became of it."""
        vm, task_id = req.vm, new_id()
        record: int | None = None
        if req.request_id is not None and self._request_ids is not None:
            earlier, record = await self._request_ids.reserve(vm, kind, req.request_id, task_id)
            if record is None:
                return await self._earlier(earlier, kind, req.request_id)
        queued = written = False
        try:
            await check()
            await self._leases.take(vm, kind, task_id)
            await check()
            try:
                task, _ = await self._store.create(kind, vm, task_id=task_id)
                written = True
                await self._queue.enqueue(WorkItem(task_id, kind, vm, req.name, description))
            except BaseException as exc:
                # The write or the publish may have landed although it failed here (a deadline): a task
                # that exists must not stay queued with no work item, and a work item then finds it failed.
                written = await self._abandon(task_id, exc)
                raise
            queued = True
            return task
        finally:
            if not queued:
                await _bounded(self._leases.release_for(vm, task_id), f"the lease of task {task_id}")
                if record is not None and not written and self._request_ids is not None:
                    await _bounded(self._request_ids.forget(vm, kind, req.request_id or "", record),
                                   f"request id {req.request_id}")

    async def _earlier(self, task_id: str, kind: str, request_id: str) -> Task:
        try:
            task, _ = await self._store.get(task_id)
        except NotFound:
            raise Conflict(f"request {request_id} is being submitted (task {task_id}); ask again",
                           "request_id") from None
        if task.kind != kind:
            raise Conflict(f"request id {request_id} was used for task {task_id} ({task.kind})", "request_id")
        return task

    async def _abandon(self, task_id: str, cause: BaseException) -> bool:
        """Mark a task that could not be queued failed, if it was written; return whether it may exist."""
        exists = True

        async def mark() -> None:
            nonlocal exists
            try:
                task, revision = await self._store.get(task_id)
            except NotFound:
                exists = False
                return
            if not task.finished:
                await self._store.update(task, revision, status="failed", message="failed",
                                         error=f"the task could not be queued: {_reason(cause)}")

        await _bounded(mark(), f"task {task_id} marked failed")
        return exists


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):  # what the command's 2 s deadline looks like from inside
        return "the command's deadline passed"
    return str(exc) or type(exc).__name__


async def _bounded(step: Awaitable[None], what: str) -> None:
    """Run a compensating step within COMPENSATION_DEADLINE; its failure is logged, never raised over the
    error being reported."""
    try:
        async with asyncio.timeout(COMPENSATION_DEADLINE):
            await step
    except Exception as exc:
        log.warning("%s: not done (%s)", what, exc or type(exc).__name__)
