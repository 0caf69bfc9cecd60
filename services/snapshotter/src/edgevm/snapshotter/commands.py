"""snapshot.* commands: checked at once, then queued as tasks for the workers."""

from __future__ import annotations

from edgevm.shared.commands import SnapshotCreate, SnapshotList, SnapshotListRequest, SnapshotRef, TaskReply
from edgevm.shared.errors import Conflict, NotFound
from edgevm.shared.ids import new_id
from edgevm.shared.objects import Task
from edgevm.shared.tasks import TaskStore
from edgevm.snapshotter.leases import TaskLeases
from edgevm.snapshotter.operations import SnapshotOperations, to_snapshot
from edgevm.snapshotter.records import VmRecords
from edgevm.snapshotter.workqueue import WorkItem, WorkQueue


class SnapshotCommands:
    """The snapshot commands of one node."""

    def __init__(self, records: VmRecords, operations: SnapshotOperations, store: TaskStore,
                 leases: TaskLeases, queue: WorkQueue) -> None:
        self._records = records
        self._ops = operations
        self._store = store
        self._leases = leases
        self._queue = queue

    async def create(self, req: SnapshotCreate) -> TaskReply:
        """snapshot.create: the mode follows the VM's firmware (bios internal, uefi external)."""
        await self._records.get(req.vm)
        await self._ops.root_disk(req.vm)  # 422 for a VM without a disk of its own
        if await self._ops.snapshots.get(req.vm, req.name) is not None:
            raise Conflict(f"VM {req.vm} has a snapshot named {req.name} already", "name")
        return TaskReply(await self._submit("snapshot.create", req.vm, req.name, req.description))

    async def restore(self, req: SnapshotRef) -> TaskReply:
        """snapshot.restore."""
        await self._known(req)
        return TaskReply(await self._submit("snapshot.restore", req.vm, req.name))

    async def delete(self, req: SnapshotRef) -> TaskReply:
        """snapshot.delete."""
        await self._known(req)
        return TaskReply(await self._submit("snapshot.delete", req.vm, req.name))

    async def list(self, req: SnapshotListRequest) -> SnapshotList:
        """snapshot.list: every snapshot with its parent, oldest first; `current` marks where the VM is."""
        await self._records.get(req.vm)
        return SnapshotList([to_snapshot(req.vm, info) for info in await self._ops.snapshots.list(req.vm)])

    async def _known(self, req: SnapshotRef) -> None:
        await self._records.get(req.vm)
        if await self._ops.snapshots.get(req.vm, req.name) is None:
            raise NotFound(f"VM {req.vm} has no snapshot named {req.name}", "name")

    async def _submit(self, kind: str, vm: str, name: str, description: str = "") -> Task:
        """Lease the VM (409 names the task holding it), write the queued task, queue its work item."""
        task_id = new_id()
        try:
            await self._leases.take(vm, kind, task_id)
        except Conflict as busy:
            raise Conflict(busy.message, "vm") from None
        try:
            task, revision = await self._store.create(kind, vm, task_id=task_id)
        except BaseException:
            await self._leases.release_for(vm, task_id)
            raise
        try:
            await self._queue.enqueue(WorkItem(task_id, kind, vm, name, description))
        except BaseException as exc:
            await self._store.update(task, revision, status="failed", message="failed",
                                     error=f"the task could not be queued: {exc}")
            await self._leases.release_for(vm, task_id)
            raise
        return task
