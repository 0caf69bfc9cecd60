"""Running the lifecycle's long operations as tasks: lease the VM, report progress, end with a result."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from edgevm.lifecycle.taskindex import TaskIndex
from edgevm.shared.ids import new_id
from edgevm.shared.locks import HeldLease, VmLocks
from edgevm.shared.objects import Task
from edgevm.shared.runtime import drain
from edgevm.shared.tasks import TaskStore, failure_text

log = logging.getLogger(__name__)

Progress = Callable[[int, str], Awaitable[None]]
PROGRESS_INTERVAL = 0.2  # seconds between two progress writes of one task
Work = Callable[[Progress], Awaitable[dict[str, Any] | None]]


class TaskRunner:
    """Starts tasks in this process; each holds its VM's lease from submit to end."""

    def __init__(self, store: TaskStore, locks: VmLocks, index: TaskIndex) -> None:
        self._store = store
        self._locks = locks
        self._index = index
        self._running: set[asyncio.Task[None]] = set()
        self._vms: dict[str, int] = {}  # VMs leased by tasks of this process (a count per VM)

    def holds(self, vm: str) -> bool:
        """Whether a task of this process holds `vm`'s lease now (no bucket read needed to know)."""
        return self._vms.get(vm, 0) > 0

    async def submit(self, kind: str, vm: str | None, work: Work, lease: HeldLease | None = None) -> Task:
        """Lease the VM (409 when busy), write the queued task and start it; return it at once."""
        task_id = new_id()
        if vm is not None and lease is None:
            lease = await self._locks.take(vm, kind, task_id)
        try:
            task, revision = await self._store.create(kind, vm, task_id=task_id)
        except BaseException:
            if lease is not None:
                await lease.release()
            raise
        self._index.put(task)
        if vm is not None and lease is not None:
            self._vms[vm] = self._vms.get(vm, 0) + 1
        job = asyncio.create_task(self._run(task, revision, work, lease), name=f"task {kind} {task.id}")
        self._running.add(job)
        job.add_done_callback(self._running.discard)
        return task

    async def _run(self, task: Task, revision: int, work: Work, lease: HeldLease | None) -> None:
        writes = asyncio.Lock()  # the task's writes are revision-chained: one at a time
        pending: tuple[int, str] | None = None
        flusher: asyncio.TimerHandle | None = None
        last_write = 0.0
        loop = asyncio.get_running_loop()

        async def write(**changes: Any) -> None:
            nonlocal task, revision, last_write
            async with writes:
                if task.finished:  # a late progress flush never rewrites an ended task
                    return
                task, revision = await self._store.update(task, revision, **changes)
                last_write = loop.time()
            self._index.put(task)

        async def flush() -> None:
            # Progress is for people watching: a write that fails is logged, never the task's failure.
            nonlocal pending
            if pending is not None and not task.finished:
                percent, message = pending
                pending = None
                try:
                    await write(progress=percent, message=message)
                except Exception as exc:
                    log.warning("task %s: progress %d%% not recorded: %s", task.id, percent, exc)

        def flush_later() -> None:
            nonlocal flusher
            flusher = None
            job: asyncio.Task[None] = asyncio.create_task(flush())
            self._running.add(job)
            job.add_done_callback(self._running.discard)

        async def progress(percent: int, message: str) -> None:
            # Steps of a fast task are not worth a write each: at most one progress write per
            # PROGRESS_INTERVAL, the latest step winning; a slow step still shows within the interval.
            nonlocal pending, flusher
            pending = (percent, message)
            if loop.time() - last_write >= PROGRESS_INTERVAL:
                await flush()
            elif flusher is None:
                flusher = loop.call_at(last_write + PROGRESS_INTERVAL, flush_later)

        async def free() -> None:
            nonlocal lease
            if lease is None:
                return
            held, lease = lease, None
            if task.vm is not None:
                self._vms[task.vm] -= 1
                if not self._vms[task.vm]:
                    del self._vms[task.vm]
            try:
                await held.release()
            except Exception as exc:
                # The lease expires by itself (bucket TTL); the task's end must still be written.
                log.warning("task %s: the lease on %s was not given back (it expires in 30 s): %s",
                            task.id, task.vm, exc)

        ending: dict[str, Any]
        try:
            await write(status="running", message="running")
            try:
                result = await work(progress)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                ending = {"status": "failed", "error": describe(exc), "message": "failed"}
            else:
                ending = {"status": "succeeded", "result": result, "message": "done"}
            if flusher is not None:
                flusher.cancel()
            pending = None
            # The VM is free before the task says it ended: whoever sees the end may act on the VM at once.
            await free()
            await write(**ending)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("task %s %s could not record its end", task.kind, task.id)
        finally:
            if flusher is not None:
                flusher.cancel()
            await free()

    async def drain(self, timeout: float = 30) -> None:
        """Wait for the running tasks to end (at shutdown); cancel what is still running after `timeout`."""
        await drain(self._running, timeout)


def describe(exc: BaseException) -> str:
    """Return why a task failed as a whole sentence, without Python internals."""
    return failure_text(exc, "lifecycle")
