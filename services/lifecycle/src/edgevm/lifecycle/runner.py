"""Running the lifecycle's long operations as tasks: lease the VM, report progress, end with a result."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from edgevm.lifecycle.taskindex import TaskIndex
from edgevm.shared.errors import EdgevmError, to_edgevm_error
from edgevm.shared.ids import new_id
from edgevm.shared.locks import HeldLease, VmLocks
from edgevm.shared.objects import Task
from edgevm.shared.tasks import TaskStore

log = logging.getLogger(__name__)

Progress = Callable[[int, str], Awaitable[None]]
Work = Callable[[Progress], Awaitable[dict[str, Any] | None]]


class TaskRunner:
    """Starts tasks in this process; each holds its VM's lease from submit to end."""

    def __init__(self, store: TaskStore, locks: VmLocks, index: TaskIndex) -> None:
        self._store = store
        self._locks = locks
        self._index = index
        self._running: set[asyncio.Task[None]] = set()

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
        job = asyncio.create_task(self._run(task, revision, work, lease), name=f"task {kind} {task.id}")
        self._running.add(job)
        job.add_done_callback(self._running.discard)
        return task

    async def _run(self, task: Task, revision: int, work: Work, lease: HeldLease | None) -> None:
        try:
            task, revision = await self._store.update(task, revision, status="running", message="running")
            self._index.put(task)

            async def progress(percent: int, message: str) -> None:
                nonlocal task, revision
                task, revision = await self._store.update(task, revision, progress=percent, message=message)
                self._index.put(task)

            try:
                result = await work(progress)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                task, revision = await self._store.update(
                    task, revision, status="failed", error=describe(exc), message="failed"
                )
            else:
                task, revision = await self._store.update(
                    task, revision, status="succeeded", result=result, message="done"
                )
            self._index.put(task)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("task %s %s could not record its end", task.kind, task.id)
        finally:
            if lease is not None:
                await lease.release()

    async def drain(self, timeout: float = 30) -> None:
        """Wait for the running tasks to end (at shutdown); cancel what is still running after `timeout`."""
        if not self._running:
            return
        _, late = await asyncio.wait(self._running, timeout=timeout)
        for job in late:
            job.cancel()
        await asyncio.gather(*late, return_exceptions=True)


def describe(exc: BaseException) -> str:
    """Return why a task failed as a whole sentence, without Python internals."""
    error = to_edgevm_error(exc)
    if error is not None:
        return error.message
    if isinstance(exc, EdgevmError | OSError | ValueError):
        return str(exc)
    log.error("task failed unexpectedly", exc_info=exc)
    return f"internal error ({type(exc).__name__}); the lifecycle log has the details"
