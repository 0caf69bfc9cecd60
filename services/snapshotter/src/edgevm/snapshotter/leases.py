"""The per-VM leases of snapshot tasks: taken at submit, handed to the worker, adopted after a restart."""

from __future__ import annotations

import logging

from nats.js.kv import KeyValue

from edgevm.shared.errors import Conflict
from edgevm.shared.locks import HeldLease, VmLocks

log = logging.getLogger(__name__)


class TaskLeases:
    """Leases held for queued or running snapshot tasks, by task id."""

    def __init__(self, locks: VmLocks, kv: KeyValue, node: str) -> None:
        self._locks = locks
        self._kv = kv
        self._node = node
        self._held: dict[str, HeldLease] = {}

    async def take(self, vm: str, operation: str, task_id: str) -> None:
        """Lease `vm` for task `task_id`, or raise Conflict naming the operation and task that hold it."""
        self._held[task_id] = await self._locks.take(vm, operation, task_id)

    async def claim(self, vm: str, operation: str, task_id: str) -> HeldLease:
        """The task's lease for its worker: handed over in this process, adopted from a dead holder
        (the lease still names the task), or taken anew; Conflict when another operation holds the VM."""
        lease = self._held.pop(task_id, None)
        if lease is not None:
            return lease
        try:
            return await self._locks.take(vm, operation, task_id)
        except Conflict:
            adopted = await self._adopt(vm, task_id)
            if adopted is None:
                raise
            return adopted

    async def _adopt(self, vm: str, task_id: str) -> HeldLease | None:
        holder = await self._locks.holder(vm)
        if holder is None or holder.task_id != task_id:
            return None
        entry = await self._kv.get(f"{self._node}.{vm}")
        assert entry.revision is not None
        return HeldLease(self._locks, vm, entry.revision)

    async def release_for(self, vm: str, task_id: str) -> None:
        """Give back whatever lease task `task_id` holds on `vm` (it ended, or was cancelled)."""
        lease = self._held.pop(task_id, None)
        if lease is None:
            lease = await self._adopt(vm, task_id)
        if lease is not None:
            await lease.release()

    async def release_all(self) -> None:
        """Give back the leases of tasks no worker of this process started (at shutdown)."""
        for task_id in list(self._held):
            lease = self._held.pop(task_id)
            try:
                await lease.release()
            except Exception as exc:
                log.warning("lease of task %s not released: %s", task_id, exc)
