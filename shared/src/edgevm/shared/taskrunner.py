"""Running tasks: lease the VM, record queued -> running -> progress -> end, give the lease back.

The lifecycle submits its tasks here (`submit`: lease, queued, then run in the background); the snapshot
workers take theirs from the work queue, take the lease over and `run` them. Either way a task's life is
written by `run` alone: running (or resumed), progress at most every PROGRESS_INTERVAL, the end written
with retries, the lease given back before the end is written (whoever sees the end may act on the VM).
A task cut by a shutdown keeps its lease when the runner says so (`keep_lease_when_cancelled`), so the next
process can take the task over and resume it from the backend's real state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from edgevm.shared.background import Background
from edgevm.shared.errors import Conflict
from edgevm.shared.ids import new_id
from edgevm.shared.locks import HeldLease, VmLocks
from edgevm.shared.objects import Task
from edgevm.shared.tasks import TaskStore, failure_text

log = logging.getLogger(__name__)

Progress = Callable[[int, str], Awaitable[None]]
Work = Callable[[Progress], Awaitable[dict[str, Any] | None]]
PROGRESS_INTERVAL = 0.2  # seconds between two progress writes of one task
FINAL_WRITE_TRIES = 5


class LeaseLost(Conflict):
    """The VM's lease expired under a running task (NATS unreachable for longer than its lifetime)."""


class TaskRunner:
    """Runs the tasks of one service process; each holds its VM's lease until it ends."""

    def __init__(self, store: TaskStore, locks: VmLocks, service: str, *, holder: str | None = None,
                 on_write: Callable[[Task], None] | None = None, keep_lease_when_cancelled: bool = False,
                 progress_interval: float = PROGRESS_INTERVAL) -> None:
        self._store = store
        # The process the leases of submitted tasks name (`locks.process_instance()`), so that a later run
        # can tell a task whose process died from one that still runs, and take it over.
        self._holder = holder
        self._locks = locks
        self._service = service
        self._on_write = on_write or (lambda task: None)
        self._keep_lease_when_cancelled = keep_lease_when_cancelled
        self._interval = progress_interval
        self._running = Background(f"{service} tasks")
        self._vms: dict[str, int] = {}  # VMs leased by tasks of this process (a count per VM)

    def holds(self, vm: str) -> bool:
        """Whether a task of this process holds `vm`'s lease now (no bucket read needed to know)."""
        return self._vms.get(vm, 0) > 0

    def describe(self, exc: BaseException) -> str:
        """Why a task of this service failed, as a whole sentence without Python internals."""
        return failure_text(exc, self._service)

    async def submit(self, kind: str, vm: str | None, work: Work, lease: HeldLease | None = None,
                     task_id: str | None = None) -> Task:
        """Lease the VM (409 when busy), write the queued task and start it; return it at once.

        `task_id`: the id the caller made (`ids.new_id`) to write something under it before the task exists.
        """
        task_id = task_id or new_id()
        if vm is not None and lease is None:
            lease = await self._locks.take(vm, kind, task_id, holder=self._holder)
        try:
            task, revision = await self._store.create(kind, vm, task_id=task_id)
        except BaseException:
            if lease is not None:
                await lease.release()
            raise
        self._on_write(task)
        # Counted in `holds` from now on, not from when the task gets to run.
        held = _Lease(lease, vm, self._vms)
        self._running.start(self._run_logged(task, revision, work, held), f"task {kind} {task.id}")
        return task

    async def run(self, task: Task, revision: int, work: Work, lease: HeldLease | None) -> None:
        """Run a written task to its end under `lease`: running (or resumed), work, end, release.

        A write that fails before the work starts is raised (the caller may offer the task again); a task
        cancelled while queued is not run. The work's own failure ends the task `failed`.
        """
        await self._run(task, revision, work, _Lease(lease, task.vm, self._vms))

    async def _run(self, task: Task, revision: int, work: Work, held: _Lease) -> None:
        try:
            started = await self._start(task, revision)
            if started is None:
                return
            run = _Run(self, *started, held)
            ending = await run.work(work)
            await held.free()  # before the end is written: whoever sees the end may act on the VM at once
            await self._finish(run.task, run.revision, **ending)
        except asyncio.CancelledError:
            if self._keep_lease_when_cancelled:
                await held.keep()  # the backend may still be at work: the lease lapses, a next run resumes
            raise
        finally:
            await held.free()

    async def _run_logged(self, task: Task, revision: int, work: Work, held: _Lease) -> None:
        try:
            await self._run(task, revision, work, held)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("task %s %s could not record its end", task.kind, task.id)

    async def _start(self, task: Task, revision: int) -> tuple[Task, int] | None:
        """Mark the task running (resumed when it ran before); None when it ended meanwhile (cancelled)."""
        try:
            if task.status == "running":
                message = f"resumed after a restart of the {self._service}"
                return await self._write(task, revision, message=message)
            return await self._write(task, revision, status="running", message="running")
        except Conflict:
            current, revision = await self._store.get(task.id)
            if current.finished:
                return None
            return await self._start(current, revision)

    async def _write(self, task: Task, revision: int, **changes: Any) -> tuple[Task, int]:
        task, revision = await self._store.update(task, revision, **changes)
        self._on_write(task)
        return task, revision

    async def _finish(self, task: Task, revision: int, **changes: Any) -> None:
        """Write the task's end, trying FINAL_WRITE_TRIES times (a lost write would run the task again)."""
        for attempt in range(FINAL_WRITE_TRIES):
            try:
                await self._write(task, revision, **changes)
                return
            except Exception as exc:
                if attempt == FINAL_WRITE_TRIES - 1:
                    raise
                log.warning("task %s: its end not recorded yet (%s); trying again", task.id, exc)
                await asyncio.sleep(0.5 * 2**attempt)
                with contextlib.suppress(Exception):
                    task, revision = await self._store.get(task.id)
                    if task.finished:  # the write landed, only its answer was lost
                        self._on_write(task)
                        return

    async def drain(self, timeout: float = 30) -> None:
        """Wait for the running tasks to end (at shutdown); cancel what is still running after `timeout`."""
        await self._running.drain(timeout)


class _Lease:
    """A task's lease, counted in the runner's `holds` while the task has it."""

    def __init__(self, lease: HeldLease | None, vm: str | None, counts: dict[str, int]) -> None:
        self.lease = lease
        self._name = vm
        self._vm = vm if lease is not None else None
        self._counts = counts
        if self._vm is not None:
            counts[self._vm] = counts.get(self._vm, 0) + 1

    @property
    def lost(self) -> bool:
        """Whether the lease changed hands or expired under the task."""
        return self.lease is not None and self.lease.lost

    def _forget(self) -> HeldLease | None:
        held, self.lease = self.lease, None
        if self._vm is not None:
            self._counts[self._vm] -= 1
            if not self._counts[self._vm]:
                del self._counts[self._vm]
            self._vm = None
        return held

    async def keep(self) -> None:
        """Stop renewing without giving the lease back: it lapses, or the next run takes it over."""
        held = self._forget()
        if held is not None:
            await held.stop()

    async def free(self) -> None:
        """Give the lease back; a failure is logged (the lease expires by itself with the bucket's TTL)."""
        held = self._forget()
        if held is None:
            return
        try:
            await held.release()
        except Exception as exc:
            log.warning("the lease on %s was not given back (it expires in 30 s): %s", self._name, exc)


class _Run:
    """One run of a task's work: its progress writes, throttled, and the end it comes to."""

    def __init__(self, runner: TaskRunner, task: Task, revision: int, lease: _Lease) -> None:
        self._runner = runner
        self.task = task
        self.revision = revision
        self._lease = lease
        self._writes = asyncio.Lock()  # the task's writes are revision-chained: one at a time
        self._pending: tuple[int, str] | None = None
        self._flusher: asyncio.TimerHandle | None = None
        self._last_write = asyncio.get_running_loop().time()  # `running` was just written
        self._over = False

    async def work(self, work: Work) -> dict[str, Any]:
        """Run `work`; return the changes that end the task (succeeded with its result, or failed)."""
        try:
            result = await work(self.progress)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return {"status": "failed", "error": self._runner.describe(exc), "message": "failed"}
        else:
            return {"status": "succeeded", "result": result, "message": "done"}
        finally:
            self._over = True
            if self._flusher is not None:
                self._flusher.cancel()
            async with self._writes:  # a progress write under way ends before the end is written
                pass

    async def progress(self, percent: int, message: str) -> None:
        """Record a step. Steps of a fast task are not worth a write each: at most one write per interval,
        the latest step winning; a slow step still shows within the interval."""
        if self._lease.lost:
            raise LeaseLost(f"the lease on VM {self.task.vm} expired while the task ran (NATS was unreachable "
                            "for longer than its lifetime); the task stopped before its next step")
        self._pending = (percent, message)
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_write >= self._runner._interval:
            await self._flush()
        elif self._flusher is None:
            self._flusher = loop.call_at(self._last_write + self._runner._interval, self._flush_later)

    def _flush_later(self) -> None:
        self._flusher = None
        self._runner._running.start(self._flush(), f"task {self.task.id} progress")

    async def _flush(self) -> None:
        # Progress is for people watching: a write that fails is logged, never the task's failure.
        async with self._writes:
            if self._pending is None or self._over:
                return
            (percent, message), self._pending = self._pending, None
            try:
                self.task, self.revision = await self._runner._write(self.task, self.revision, progress=percent,
                                                                     message=message)
                self._last_write = asyncio.get_running_loop().time()
            except Exception as exc:
                log.warning("task %s: progress %d%% not recorded: %s", self.task.id, percent, exc)
                with contextlib.suppress(Exception):
                    self.task, self.revision = await self._runner._store.get(self.task.id)
