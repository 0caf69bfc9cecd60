"""Resuming the lifecycle's tasks a restart cut: each goes on from what libvirt and the files say now.

A task keeps its id and started_at; it runs again under its VM's lease (taken over from the dead process)
and ends `succeeded`, or `failed` with the real reason. What each kind does when resumed:
- vm.start: starts the domain unless it runs, then activates its network (idempotent in netplumb).
- vm.stop: a domain already off just ends; else the ACPI shutdown is sent again and waited for during what is
  left of the VM's stop_timeout (counted from the task's start), then destroyed. A forced stop is not told
  apart (the Task has no field for it); it destroyed the domain at its first step, so it rarely runs again.
- vm.restart: the stop as above, then the start.
- vm.delete: its remaining steps, each idempotent (stop, release network, undefine, remove files, record).
- image.import: fails: the request's source is not kept in the task, and the partial copy was removed at
  start-up (`ImageStore.remove_partials`), so the import must be asked for again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from edgevm.lifecycle.taskindex import TaskIndex
from edgevm.lifecycle.vms import VmService
from edgevm.shared.errors import Conflict, EdgevmError, NotFound
from edgevm.shared.locks import HeldLease, VmLocks
from edgevm.shared.objects import Task
from edgevm.shared.taskrunner import Progress, TaskRunner, Work
from edgevm.shared.tasks import TaskStore

log = logging.getLogger(__name__)
OWN_TASK_KINDS = ("vm.", "image.")


class ImportCut(EdgevmError):
    """An image import cut by a restart: its partial copy is gone and its source was not kept."""

    code = "500"


@dataclass
class Resumption:
    """A cut task whose lease this process took over, waiting to run again."""

    task: Task
    revision: int
    lease: HeldLease | None

    async def abandon(self) -> None:
        """Not run after all (a shutdown came first): stop renewing; the next process takes it over."""
        if self.lease is not None:
            await self.lease.stop()


class Resumer:
    """Finds the lifecycle's unfinished tasks at start-up and runs each again from the real state."""

    def __init__(self, index: TaskIndex, store: TaskStore, locks: VmLocks, runner: TaskRunner, vms: VmService,
                 holder: str) -> None:
        self._index = index
        self._store = store
        self._locks = locks
        self._runner = runner
        self._vms = vms
        self._holder = holder

    async def take_over_all(self) -> list[Resumption]:
        """Take over every unfinished task of this service (before `recover`: a VM someone was stopping or
        deleting is then not auto-started); return them, to `run` once the network answers."""
        taken: list[Resumption] = []
        for task in self._index.unfinished():
            if not task.kind.startswith(OWN_TASK_KINDS):
                continue
            try:
                current, revision = await self._store.get(task.id)
            except NotFound:
                continue
            if current.finished:
                continue
            resumption = await self._take_over(current, revision)
            if resumption is not None:
                taken.append(resumption)
        return taken

    async def _take_over(self, task: Task, revision: int) -> Resumption | None:
        lease: HeldLease | None = None
        if task.vm is not None:
            try:
                lease = await self._locks.take_over(task.vm, task.kind, task.id, self._holder)
            except Conflict as exc:
                await self._store.update(task, revision, status="failed", message="interrupted",
                                         error=f"the lifecycle service restarted while this task ran, and it could"
                                               f" not go on: {exc.message}")
                return None
        if task.vm is not None and task.kind in ("vm.stop", "vm.delete"):
            self._vms.reconciler.keep_off(task.vm)  # someone asked it off: no auto start at recovery
        return Resumption(task, revision, lease)

    async def run(self, taken: Resumption) -> None:
        """Run a task taken over to its end, from the real state of its VM."""
        task = taken.task
        log.warning("task %s %s of %s was cut by the last restart: resuming it", task.kind, task.id, task.vm)
        await self._runner.run(task, taken.revision, self._work(task), taken.lease)

    def _work(self, task: Task) -> Work:
        name = task.vm or ""
        tasks = self._vms.tasks
        if task.kind == "vm.start":
            return lambda progress: tasks.start(name, progress)  # a VM deleted meanwhile: 404 from its record
        if task.kind == "vm.stop":
            return lambda progress: self._stop(task, progress)
        if task.kind == "vm.restart":
            async def restart(progress: Progress) -> dict[str, Any] | None:
                await self._stop(task, progress)
                return await tasks.start(name, progress)
            return restart
        if task.kind == "vm.delete":
            return lambda progress: self._delete(name, progress)
        return self._cut_import

    async def _stop(self, task: Task, progress: Progress) -> dict[str, Any] | None:
        name = task.vm or ""
        timeout = self._vms.records.get(name).spec.stop_timeout
        if task.started_at is not None:
            timeout = max(0.0, timeout - _since(task.started_at))
        return await self._vms.tasks.stop(name, False, progress, timeout)

    async def _delete(self, name: str, progress: Progress) -> dict[str, Any] | None:
        if self._vms.records.find(name) is None:
            return None  # its record was the last step: the delete was done
        return await self._vms.tasks.delete(name, progress)

    @staticmethod
    async def _cut_import(progress: Progress) -> dict[str, Any] | None:
        raise ImportCut("the lifecycle service restarted during the import's copy; the partial copy was removed"
                        " at start-up: import the image again")


def _since(stamp: str) -> float:
    started = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return max(0.0, (datetime.now(started.tzinfo) - started).total_seconds())

