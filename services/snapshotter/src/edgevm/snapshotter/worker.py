"""The workers: take snapshot tasks off the queue, run them under the VM's lease, report every step."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec
from nats.aio.msg import Msg

from edgevm.shared.errors import Conflict, EdgevmError, NotFound, to_edgevm_error
from edgevm.shared.objects import Task
from edgevm.shared.tasks import TaskStore
from edgevm.snapshotter.leases import TaskLeases
from edgevm.snapshotter.operations import Progress, SnapshotOperations
from edgevm.snapshotter.records import VmRecords
from edgevm.snapshotter.workqueue import PROGRESS_EVERY, WorkItem, WorkQueue, decode_item

log = logging.getLogger(__name__)
FETCH_WAIT = 5.0
BUSY_RETRY = 1.0  # seconds before a task whose VM another operation holds is offered again


def describe(exc: BaseException) -> str:
    """Why a task failed, as a whole sentence without Python internals."""
    error = to_edgevm_error(exc)
    if error is not None:
        return error.message
    if isinstance(exc, OSError | ValueError):
        return str(exc)
    log.error("snapshot task failed unexpectedly", exc_info=exc)
    return f"internal error ({type(exc).__name__}); the snapshotter's log has the details"


class Workers:
    """Runs up to `concurrency` snapshot tasks at a time (of different VMs: the lease allows one per VM)."""

    def __init__(self, queue: WorkQueue, store: TaskStore, leases: TaskLeases, records: VmRecords,
                 operations: SnapshotOperations, concurrency: int = 2) -> None:
        self._queue = queue
        self._store = store
        self._leases = leases
        self._records = records
        self._ops = operations
        self._slots = asyncio.Semaphore(concurrency)
        self._running: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Fetch and run tasks until cancelled; a fetch never waits longer than FETCH_WAIT."""
        while True:
            await self._slots.acquire()
            try:
                messages = await self._queue.fetch(FETCH_WAIT)
            except asyncio.CancelledError:
                self._slots.release()
                raise
            except Exception as exc:
                self._slots.release()
                log.warning("fetching snapshot work failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            if not messages:
                self._slots.release()
                continue
            for message in messages:
                job = asyncio.create_task(self._handle_then_free(message))
                self._running.add(job)
                job.add_done_callback(self._running.discard)

    async def drain(self, timeout: float = 60.0) -> None:
        """Wait for the running tasks to end (at shutdown); cancel what still runs after `timeout`:
        their messages are not acknowledged, so a worker of the next start finishes them."""
        if not self._running:
            return
        _, late = await asyncio.wait(self._running, timeout=timeout)
        for job in late:
            job.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    async def _handle_then_free(self, message: Msg) -> None:
        try:
            await self.handle(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("snapshot work item not handled; it will be offered again")
            with contextlib.suppress(Exception):
                await message.nak(delay=BUSY_RETRY)
        finally:
            self._slots.release()

    async def handle(self, message: Msg) -> None:
        """Run one queued task to its end and acknowledge it; a finished or cancelled one is skipped."""
        try:
            item = decode_item(message.data)
        except Exception:
            log.error("dropping a work item that is not one: %r", message.data[:200])
            await message.term()
            return
        try:
            task, revision = await self._store.get(item.task_id)
        except NotFound:
            log.warning("task %s is gone from the task bucket: its work is dropped", item.task_id)
            await self._leases.release_for(item.vm, item.task_id)
            await message.ack()
            return
        if task.finished:  # cancelled while queued, or finished before a redelivery
            await self._leases.release_for(item.vm, item.task_id)
            await message.ack()
            return
        try:
            lease = await self._leases.claim(item.vm, item.kind, item.task_id)
        except Conflict as busy:
            log.info("task %s waits: %s", item.task_id, busy.message)
            await message.nak(delay=BUSY_RETRY)
            return
        keeper = asyncio.create_task(_keep_in_progress(message))
        try:
            started = await self._start(task, revision)
            if started is not None:
                await self._run(item, *started)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            await lease.release()
        await message.ack()

    async def _start(self, task: Task, revision: int) -> tuple[Task, int] | None:
        resumed = task.status == "running"
        try:
            if resumed:
                return await self._store.update(task, revision, message="resumed after a restart of the snapshotter")
            return await self._store.update(task, revision, status="running", message="running")
        except Conflict:
            current, revision = await self._store.get(task.id)  # cancelled meanwhile?
            if current.finished:
                return None
            return await self._start(current, revision)

    async def _run(self, item: WorkItem, task: Task, revision: int) -> None:
        async def progress(percent: int, message: str) -> None:
            nonlocal task, revision
            task, revision = await self._store.update(task, revision, progress=percent, message=message)

        try:
            result = await self._execute(item, progress)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._store.update(task, revision, status="failed", message="failed", error=describe(exc))
        else:
            await self._store.update(task, revision, status="succeeded", message="done", result=result)

    async def _execute(self, item: WorkItem, progress: Progress) -> dict[str, Any] | None:
        vm = await self._records.get(item.vm)
        ops = self._ops
        external = vm.spec.firmware == "uefi"
        if item.kind == "snapshot.create":
            if external:
                snapshot = await ops.create_external(item.vm, item.name, item.description, item.task_id, progress)
            else:
                snapshot = await ops.create_internal(item.vm, item.name, item.description, progress)
            return _builtins(snapshot)
        if item.kind == "snapshot.restore":
            if external:
                snapshot = await ops.restore_external(item.vm, item.name, item.task_id, progress)
            else:
                snapshot = await ops.restore_internal(item.vm, item.name, progress)
            return _builtins(snapshot)
        if item.kind == "snapshot.delete":
            if external:
                await ops.delete_external(item.vm, item.name, progress)
            else:
                await ops.delete_internal(item.vm, item.name, progress)
            return None
        raise EdgevmError(f"unknown snapshot task kind {item.kind}")


def _builtins(value: Any) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.to_builtins(value)
    return result


async def _keep_in_progress(message: Msg) -> None:
    """Tell JetStream the task is alive, so the message is not given to another worker meanwhile."""
    while True:
        await asyncio.sleep(PROGRESS_EVERY)
        try:
            await message.in_progress()
        except Exception as exc:
            log.warning("in-progress ack not sent: %s", exc)
