"""Resuming the lifecycle's tasks a restart cut: each goes on from what libvirt and the files say now.

A task keeps its id and started_at; it runs again under its VM's lease (taken over from the dead process)
and ends `succeeded`, or `failed` with the real reason. What the Task does not carry of the request (an
import's source, a stop's `force`) was kept in `<state>/lifecycle/requests/` before the task was accepted
(intents.KeptRequests); a request file that cannot be read fails its task saying so, start-up goes on.
What each kind does when resumed:
- vm.start: starts the domain unless it runs, then activates its network (idempotent in netplumb).
- vm.stop: a forced stop destroys the domain at once (unless it is off already), as its first run would
  have, and ends with `{"forced": true}`. A graceful one ends at once when the domain is off; else the ACPI
  shutdown is sent again and waited for during what is left of the VM's stop_timeout (counted from the
  task's start), then the domain is destroyed.
- vm.restart: the graceful stop as above (vm.restart has no force), then the start.
- vm.delete: its remaining steps, each idempotent (stop, release network, undefine, remove files, record).
- image.import: starts the copy again from the request's source, checked again as the request was (inside
  the import roots, a regular file, no symbolic link swapped in, not empty, not changing), and ends with the
  Image; a source gone meanwhile fails it naming the source. Its partial copy was removed at start-up
  (`ImageStore.remove_partials`, and a whole copy without its record by `ImageService.load`); an import whose
  record was written before the cut ends with that Image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from edgevm.lifecycle.images import failing
from edgevm.lifecycle.intents import RequestUnreadable
from edgevm.lifecycle.taskindex import TaskIndex
from edgevm.lifecycle.vms import VmService
from edgevm.shared.errors import Conflict, EdgevmError, NotFound
from edgevm.shared.locks import HeldLease, VmLocks
from edgevm.shared.objects import Task
from edgevm.shared.taskrunner import Progress, TaskRunner, Work
from edgevm.shared.tasks import TaskStore

log = logging.getLogger(__name__)
OWN_TASK_KINDS = ("vm.", "image.")


class StopCut(EdgevmError):
    """A vm.stop cut by a restart whose kept request cannot be read: whether it was forced is not known."""

    code = "500"


@dataclass
class Resumption:
    """A cut task whose lease this process took over, waiting to run again."""

    task: Task
    revision: int
    lease: HeldLease | None
    work: Work

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
        self._requests = vms.images.requests

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
        swept = self._requests.sweep({t.task.id for t in taken})
        if swept:
            log.info("removed the kept requests of %d task(s) that had ended: %s", len(swept), ", ".join(swept))
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
        return Resumption(task, revision, lease, self._work(task))

    async def run(self, taken: Resumption) -> None:
        """Run a task taken over to its end, from the real state of its VM."""
        task = taken.task
        log.warning("task %s %s of %s was cut by the last restart: resuming it", task.kind, task.id, task.vm)
        await self._runner.run(task, taken.revision, taken.work, taken.lease)

    def _work(self, task: Task) -> Work:
        """The work that takes `task` on from the real state (called at take-over: before commands are served)."""
        name = task.vm or ""
        tasks = self._vms.tasks
        if task.kind == "vm.start":
            return lambda progress: tasks.start(name, progress)  # a VM deleted meanwhile: 404 from its record
        if task.kind == "vm.stop":
            try:
                force = (self._requests.read(task.id, "vm.stop") or {}).get("force") is True
            except RequestUnreadable as exc:
                return failing(StopCut(f"the lifecycle service restarted during the stop, which cannot go on: "
                                        f"{exc}: stop the VM again"))
            return lambda progress: self._stop(task, progress, force)
        if task.kind == "vm.restart":
            async def restart(progress: Progress) -> dict[str, Any] | None:
                await self._stop(task, progress, False)
                return await tasks.start(name, progress)
            return restart
        if task.kind == "vm.delete":
            return lambda progress: self._delete(name, progress)
        return self._vms.images.resumed_import(task.id)

    async def _stop(self, task: Task, progress: Progress, force: bool) -> dict[str, Any] | None:
        name = task.vm or ""
        if force:
            # Destroyed at once, as the first run would have. Its result says forced even when the domain was
            # off already: a destroy is the only power-off this stop asked for (its first run may have done it).
            await self._vms.tasks.stop(name, True, progress)
            return {"forced": True}
        timeout = self._vms.records.get(name).spec.stop_timeout
        if task.started_at is not None:
            timeout = max(0.0, timeout - _since(task.started_at))
        return await self._vms.tasks.stop(name, False, progress, timeout)

    async def _delete(self, name: str, progress: Progress) -> dict[str, Any] | None:
        if self._vms.records.find(name) is None:
            return None  # its record was the last step: the delete was done
        return await self._vms.tasks.delete(name, progress)

def _since(stamp: str) -> float:
    started = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return max(0.0, (datetime.now(started.tzinfo) - started).total_seconds())

