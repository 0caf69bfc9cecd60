"""The workers: take snapshot tasks off the queue, run them under the VM's lease, report every step."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec
from nats.aio.msg import Msg

from edgevm.shared.background import Background
from edgevm.shared.errors import Conflict, EdgevmError, NotFound
from edgevm.shared.records import VmRecordReader
from edgevm.shared.taskrunner import Progress, TaskRunner
from edgevm.shared.tasks import TaskStore, failure_text
from edgevm.snapshotter.leases import TaskLeases
from edgevm.snapshotter.operations import SnapshotOperations
from edgevm.snapshotter.workqueue import PROGRESS_EVERY, WorkItem, WorkQueue, decode_item

log = logging.getLogger(__name__)
FETCH_WAIT = 5.0
BUSY_RETRY = 1.0  # seconds before a task whose VM another operation holds is offered again, times deliveries
BUSY_RETRY_MAX = 5.0
ERROR_RETRY_MAX = 30.0  # the longest wait before a work item that could not be handled is offered again
MAX_FAILURES = 5  # a work item that cannot be handled this often in a row fails its task and is dropped


def describe(exc: BaseException) -> str:
    """Why a task failed, as a whole sentence without Python internals; never empty."""
    return failure_text(exc, "snapshotter")


def _deliveries(message: Msg) -> int:
    try:
        return int(message.metadata.num_delivered)
    except Exception:
        return 1


class _Delivery:
    """The latest delivery of a task running here: JetStream may deliver its message again meanwhile."""

    def __init__(self, message: Msg) -> None:
        self.message = message


class Workers:
    """Runs up to `concurrency` snapshot tasks at a time (of different VMs: the lease allows one per VM)."""

    def __init__(self, queue: WorkQueue, store: TaskStore, leases: TaskLeases, records: VmRecordReader,
                 operations: SnapshotOperations, concurrency: int = 2, max_failures: int = MAX_FAILURES) -> None:
        self._queue = queue
        self._store = store
        # Every step is written at once (no throttling): steps are few and slow, and each is where a run
        # cut by a crash shows it stopped. A cut task keeps its lease and is resumed by the next worker.
        self._runner = TaskRunner(store, leases.locks, "snapshotter", keep_lease_when_cancelled=True,
                                  progress_interval=0)
        self._leases = leases
        self._records = records
        self._ops = operations
        self._slots = asyncio.Semaphore(concurrency)
        self._running = Background("snapshot workers")
        self._active: dict[str, _Delivery] = {}  # task id -> its delivery, while it is handled here
        self._failures: dict[str, int] = {}  # task id -> deliveries in a row that could not be handled
        self._max_failures = max_failures

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
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # nats-py raised something else for our cancel
                    raise asyncio.CancelledError from exc
                log.warning("fetching snapshot work failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            if not messages:
                self._slots.release()
                continue
            for message in messages:
                self._running.start(self._handle_then_free(message), "snapshot work item")

    async def drain(self, timeout: float = 60.0) -> None:
        """Wait for the running tasks to end (at shutdown); cancel what still runs after `timeout`: their
        messages stay unacknowledged and their leases are left to lapse (libvirt may still be at work), so
        a worker of the next start resumes them."""
        await self._running.drain(timeout)

    async def _handle_then_free(self, message: Msg) -> None:
        try:
            await self.handle(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("snapshot work item not handled")
            with contextlib.suppress(Exception):
                await self._not_handled(message, exc)
        finally:
            self._slots.release()

    async def _not_handled(self, message: Msg, exc: Exception) -> None:
        """Offer the item again after a back-off; after max_failures in a row, fail its task and drop it."""
        item = decode_item(message.data)
        failures = self._failures.get(item.task_id, 0) + 1
        self._failures[item.task_id] = failures
        if failures < self._max_failures:
            await message.nak(delay=min(2.0 ** (failures - 1), ERROR_RETRY_MAX))
            return
        reason = f"the snapshotter could not handle the task {failures} times; the last time: {describe(exc)}"
        try:
            task, revision = await self._store.get(item.task_id)
            if not task.finished:
                await self._store.update(task, revision, status="failed", message="failed", error=reason)
        except Exception as write_error:
            log.warning("task %s: its failure not recorded (%s); offered again later", item.task_id, write_error)
            await message.nak(delay=ERROR_RETRY_MAX)
            return
        self._failures.pop(item.task_id, None)
        with contextlib.suppress(Exception):
            await self._leases.release_for(item.vm, item.task_id)
        await message.term()

    async def handle(self, message: Msg) -> None:
        """Run one queued task to its end and acknowledge it; a finished or cancelled one is skipped, and
        a task that runs in this process already is only kept from being delivered elsewhere."""
        try:
            item = decode_item(message.data)
        except Exception:
            log.error("dropping a work item that is not one: %r", message.data[:200])
            await message.term()
            return
        running = self._active.get(item.task_id)
        if running is not None:
            log.info("task %s delivered again while it runs here", item.task_id)
            running.message = message
            with contextlib.suppress(Exception):
                await message.in_progress()
            return
        delivery = self._active[item.task_id] = _Delivery(message)
        try:
            await self._handle(item, delivery)
        finally:
            del self._active[item.task_id]
        self._failures.pop(item.task_id, None)

    async def _handle(self, item: WorkItem, delivery: _Delivery) -> None:
        try:
            task, revision = await self._store.get(item.task_id)
        except NotFound:
            log.warning("task %s is gone from the task bucket: its work is dropped", item.task_id)
            await self._leases.release_for(item.vm, item.task_id)
            await delivery.message.ack()
            return
        if task.finished:  # cancelled while queued, or finished before a redelivery
            await self._leases.release_for(item.vm, item.task_id)
            await delivery.message.ack()
            return
        try:
            lease = await self._leases.claim(item.vm, item.kind, item.task_id)
        except Conflict as busy:
            log.info("task %s waits: %s", item.task_id, busy.message)
            await delivery.message.nak(delay=min(BUSY_RETRY * _deliveries(delivery.message), BUSY_RETRY_MAX))
            return
        resumed_since = task.started_at if task.status == "running" else None

        async def work(progress: Progress) -> dict[str, Any] | None:
            return await self._execute(item, progress, resumed_since)

        keeper = asyncio.create_task(_keep_in_progress(delivery))
        try:
            await self._runner.run(task, revision, work, lease)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        await delivery.message.ack()

    async def _execute(self, item: WorkItem, progress: Progress,
                       resumed_since: str | None) -> dict[str, Any] | None:
        vm = await self._records.get(item.vm)
        ops = self._ops
        external = vm.spec.firmware == "uefi"
        if item.kind == "snapshot.create":
            if external:
                snapshot = await ops.create_external(item.vm, item.name, item.description, item.task_id, progress,
                                                     resumed_since)
            else:
                snapshot = await ops.create_internal(item.vm, item.name, item.description, progress, resumed_since)
            return _builtins(snapshot)
        if item.kind == "snapshot.restore":
            if external:
                snapshot = await ops.restore_external(item.vm, item.name, item.task_id, progress)
            else:
                snapshot = await ops.restore_internal(item.vm, item.name, item.task_id, progress)
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


async def _keep_in_progress(delivery: _Delivery) -> None:
    """Tell JetStream the task is alive, so the message is not given to another worker meanwhile."""
    while True:
        await asyncio.sleep(PROGRESS_EVERY)
        try:
            await delivery.message.in_progress()
        except Exception as exc:
            log.warning("in-progress ack not sent: %s", exc)
