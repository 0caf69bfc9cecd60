"""The per-VM leases of snapshot tasks: taken at submit, taken over by the one worker that runs the task.

A lease taken at submit names the task but no holder: it keeps the VM for the queued task, renewed by the
submitting process. The worker that runs the task takes it over (`VmLocks.take_over`) naming its process,
so the submitter's renewals stop (they find the lease changed) and only one process renews it.
"""

from __future__ import annotations

import logging

from edgevm.shared.locks import HeldLease, VmLocks, process_instance

log = logging.getLogger(__name__)


class TaskLeases:
    """Leases held for queued or running snapshot tasks, by task id, for one snapshotter process."""

    def __init__(self, locks: VmLocks, instance: str | None = None) -> None:
        self.locks = locks
        self.instance = instance or process_instance()  # this process, as lease holder
        self._held: dict[str, HeldLease] = {}  # leases of queued tasks submitted here

    async def take(self, vm: str, operation: str, task_id: str) -> None:
        """Lease `vm` for task `task_id`, or raise Conflict (naming `vm`) with the operation that holds it."""
        self._held[task_id] = await self.locks.take(vm, operation, task_id, field="vm")

    async def claim(self, vm: str, operation: str, task_id: str) -> HeldLease:
        """The task's lease for the worker of this process that runs it; Conflict when another operation
        holds the VM or the task runs in a live process."""
        submitted = self._held.pop(task_id, None)
        if submitted is not None:
            await submitted.stop()
        return await self.locks.take_over(vm, operation, task_id, self.instance)

    async def release_for(self, vm: str, task_id: str) -> None:
        """Give back the lease of task `task_id` on `vm` (it ended, or was cancelled) when it is this
        process's or nobody runs the task; a live holder elsewhere releases its own."""
        lease = self._held.pop(task_id, None)
        if lease is not None:
            await lease.release()
            return
        await self.locks.release_task(vm, task_id, self.instance)

    async def release_all(self) -> None:
        """Give back the leases of tasks submitted here that no worker of this process took (at shutdown):
        a worker that runs such a task later takes the lease anew, waiting while another operation holds it."""
        for task_id in list(self._held):
            lease = self._held.pop(task_id)
            try:
                await lease.release()
            except Exception as exc:
                log.warning("lease of task %s not released: %s", task_id, exc)
