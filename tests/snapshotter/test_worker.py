"""The workers, the task leases and the submit step over a real nats-server, with the snapshot operation
itself a stub that holds a task running for as long as a test needs: redelivery, a second process,
shutdown, failing writes, a command that fails half-way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import KeyWrongLastSequenceError

from edgevm.shared.bus import LOCKS, TASKS, ensure_jetstream
from edgevm.shared.errors import Conflict
from edgevm.shared.ids import new_id
from edgevm.shared.locks import Lease, VmLocks, process_instance
from edgevm.shared.objects import Snapshot, Task
from edgevm.shared.publisher import EventPublisher
from edgevm.shared.tasks import TaskStore
from edgevm.snapshotter.commands import CreateRequest, SnapshotCommands
from edgevm.snapshotter.leases import TaskLeases
from edgevm.snapshotter.worker import Workers
from edgevm.snapshotter.workqueue import WorkItem, WorkQueue
from tests.helpers import eventually
from tests.snapshotter.conftest import unique


@dataclass
class HeldOperation:
    """snapshot.create that reports a step, then waits for `go`; counts its runs."""

    go: asyncio.Event = field(default_factory=asyncio.Event)
    runs: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def create_internal(self, vm: str, name: str, description: str, progress: Any,
                              resumed_since: str | None = None) -> Snapshot:
        self.runs += 1
        self.started.set()
        await progress(10, "saving disks")
        await self.go.wait()
        return Snapshot(name=name, vm=vm, description=description, created_at="2026-11-27T22:00:00.000Z",
                        vm_state="stopped", mode="internal", parent=None, current=True)


class BiosVms:
    """Every VM is a BIOS VM (the workers only read its firmware)."""

    async def get(self, vm: str) -> Any:
        return SimpleNamespace(spec=SimpleNamespace(firmware="bios"))


class FlakyStore(TaskStore):
    """The task bucket, with writes that fail on demand: `fail_when(changes)` says which."""

    def __init__(self, *args: Any, fail_when: Any = None) -> None:
        super().__init__(*args)
        self.fail_when = fail_when or (lambda changes: False)

    async def update(self, task: Task, revision: int, **changes: Any) -> tuple[Task, int]:
        if self.fail_when(changes):
            raise TimeoutError("nats: timeout")
        return await super().update(task, revision, **changes)


@dataclass
class Node:
    """One node's queue and buckets, and a factory of snapshotter 'processes' on it."""

    nc: NATS
    name: str
    buckets: dict[str, Any]
    queue: WorkQueue
    store: TaskStore
    op: HeldOperation = field(default_factory=HeldOperation)

    def leases(self, stale_after: float = 16.0) -> TaskLeases:
        return TaskLeases(VmLocks(self.buckets[LOCKS.name], self.name, "snapshotter", stale_after=stale_after))

    def workers(self, leases: TaskLeases, store: TaskStore | None = None, **options: Any) -> Workers:
        return Workers(self.queue, store or self.store, leases, BiosVms(), self.op, **options)  # type: ignore[arg-type]

    async def submit(self, leases: TaskLeases, vm: str) -> str:
        task_id = new_id()
        await leases.take(vm, "snapshot.create", task_id)
        await self.store.create("snapshot.create", vm, task_id=task_id)
        await self.queue.enqueue(WorkItem(task_id, "snapshot.create", vm, "s1"))
        return task_id

    async def task(self, task_id: str) -> Task:
        return (await self.store.get(task_id))[0]

    async def lease(self, vm: str) -> Lease | None:
        """The lease on `vm` as the services read it: None only when there is none (any other error raises)."""
        return await VmLocks(self.buckets[LOCKS.name], self.name, "snapshotter").holder(vm)


@pytest.fixture
async def node(nc: NATS) -> AsyncIterator[Node]:
    js = nc.jetstream()
    buckets = await ensure_jetstream(js)
    name = unique("wk")
    queue = WorkQueue(js, name)
    await queue.subscribe()
    store = TaskStore(buckets[TASKS.name], EventPublisher(js, name, "snapshotter"), name)
    yield Node(nc, name, buckets, queue, store)
    await queue.close()


async def test_a_task_delivered_again_while_it_runs_here_runs_once(node: Node) -> None:
    leases = node.leases()
    workers = node.workers(leases)
    task_id = await node.submit(leases, "vm1")
    [message] = await node.queue.fetch(5)
    first = asyncio.create_task(workers.handle(message))
    await node.op.started.wait()
    await asyncio.wait_for(workers.handle(message), 5)  # JetStream's redelivery: answered at once
    node.op.go.set()
    await asyncio.wait_for(first, 10)
    assert node.op.runs == 1
    assert (await node.task(task_id)).status == "succeeded"
    assert await node.lease("vm1") is None


async def test_another_process_neither_runs_a_live_task_nor_waits_forever_for_a_dead_one(node: Node) -> None:
    leases_a, leases_b = node.leases(), node.leases(stale_after=0.5)
    task_id = await node.submit(leases_a, "vm1")
    running = await leases_a.claim("vm1", "snapshot.create", task_id)  # process A runs the task
    with pytest.raises(Conflict) as busy:
        await leases_b.claim("vm1", "snapshot.create", task_id)
    assert leases_a.instance in busy.value.message
    await running.stop()  # A dies: its lease is renewed no more
    await asyncio.sleep(0.6)
    taken = await leases_b.claim("vm1", "snapshot.create", task_id)
    holder = await node.lease("vm1")
    assert holder is not None and (holder.task_id, holder.holder) == (task_id, leases_b.instance)
    await taken.release()


async def test_the_lease_of_a_process_that_is_gone_is_taken_over_at_once(node: Node) -> None:
    finished = await asyncio.create_subprocess_exec("true")
    await finished.wait()
    boot, namespace, _, rand = process_instance().split(".")
    dead = node.leases()
    dead.instance = f"{boot}.{namespace}.{finished.pid}.{rand}"
    task_id = await node.submit(dead, "vm1")
    await (await dead.claim("vm1", "snapshot.create", task_id)).stop()  # SIGKILL: no release, no renewal
    taken = await node.leases().claim("vm1", "snapshot.create", task_id)  # no wait of STALE_AFTER
    await taken.release()


async def test_the_worker_of_another_process_takes_over_a_queued_tasks_lease_alone(node: Node) -> None:
    submitter, worker = node.leases(), node.leases()
    task_id = await node.submit(submitter, "vm1")
    taken = await worker.claim("vm1", "snapshot.create", task_id)
    # The submitter's renewal finds the lease changed and stops; its shutdown does not release it.
    locks = VmLocks(node.buckets[LOCKS.name], node.name, "snapshotter")
    held = submitter._held[task_id]
    with pytest.raises(KeyWrongLastSequenceError):
        await locks.renew("vm1", held._revision)
    await submitter.release_all()
    holder = await node.lease("vm1")
    assert holder is not None and holder.holder == worker.instance
    assert not taken.lost
    await taken.release()
    assert await node.lease("vm1") is None


async def test_a_task_cut_by_shutdown_keeps_its_lease_and_its_message(node: Node) -> None:
    leases = node.leases()
    workers = node.workers(leases)
    task_id = await node.submit(leases, "vm1")
    fetching = asyncio.create_task(workers.run())
    await asyncio.wait_for(node.op.started.wait(), 10)
    fetching.cancel()
    await asyncio.gather(fetching, return_exceptions=True)
    await workers.drain(timeout=0.1)
    holder = await node.lease("vm1")
    assert holder is not None and holder.task_id == task_id  # libvirt may still be at work: not released
    assert (await node.task(task_id)).status == "running"
    info = await node.queue._js.consumer_info("EDGEVM_SNAPSHOT_WORK", f"snapshotter-{node.name}")
    assert info.num_ack_pending == 1  # not acknowledged: redelivered to the next worker


async def test_progress_that_cannot_be_recorded_does_not_fail_the_task(node: Node) -> None:
    leases = node.leases()
    flaky = FlakyStore(node.store._kv, node.store._publisher, node.name,
                       fail_when=lambda changes: "progress" in changes and changes.get("status") is None)
    workers = node.workers(leases, flaky)
    task_id = await node.submit(leases, "vm1")
    node.op.go.set()
    fetching = asyncio.create_task(workers.run())
    try:
        task = await eventually(lambda: _finished(node, task_id), timeout=15, what="the task ends")
    finally:
        fetching.cancel()
        await asyncio.gather(fetching, return_exceptions=True)
    assert (task.status, task.error) == ("succeeded", None)


async def test_a_work_item_that_keeps_failing_fails_its_task_and_leaves_the_queue(node: Node) -> None:
    leases = node.leases()
    broken = FlakyStore(node.store._kv, node.store._publisher, node.name,
                        fail_when=lambda changes: changes.get("status") == "running")
    workers = node.workers(leases, broken, max_failures=2)
    task_id = await node.submit(leases, "vm1")
    fetching = asyncio.create_task(workers.run())
    try:
        task = await eventually(lambda: _finished(node, task_id), timeout=15, what="the task fails")
    finally:
        fetching.cancel()
        await asyncio.gather(fetching, return_exceptions=True)
    assert task.status == "failed" and "could not handle the task 2 times" in (task.error or ""), task
    assert "nats: timeout" in (task.error or "")
    assert node.op.runs == 0 and await node.lease("vm1") is None
    info = await node.queue._js.consumer_info("EDGEVM_SNAPSHOT_WORK", f"snapshotter-{node.name}")
    assert (info.num_pending, info.num_ack_pending) == (0, 0)


async def _finished(node: Node, task_id: str) -> Task | None:
    task = await node.task(task_id)
    return task if task.finished else None


# -- submitting: what a command leaves behind when it fails half-way -------------------------------------------
class KnownVms:
    async def get(self, vm: str, field: str = "vm") -> Any:
        return SimpleNamespace()


@dataclass
class NameTakenMeanwhile:
    """libvirt's snapshots as another task changes them: the name is free at the first look only."""

    looks: int = 0

    async def get(self, vm: str, name: str) -> Any:
        self.looks += 1
        return None if self.looks == 1 else SimpleNamespace(name=name)


class RecordingStore(TaskStore):
    """The task bucket; `after_write` may fail a create after its write landed, `updates_fail` every update."""

    def __init__(self, *args: Any, after_write: BaseException | None = None, updates_fail: bool = False) -> None:
        super().__init__(*args)
        self.after_write, self.updates_fail = after_write, updates_fail
        self.written: list[str] = []

    async def create(self, *args: Any, **kwargs: Any) -> tuple[Task, int]:
        created = await super().create(*args, **kwargs)
        self.written.append(created[0].id)
        if self.after_write is not None:
            raise self.after_write
        return created

    async def update(self, task: Task, revision: int, **changes: Any) -> tuple[Task, int]:
        if self.updates_fail:
            raise TimeoutError("nats: timeout")
        return await super().update(task, revision, **changes)


class BrokenQueue:
    async def enqueue(self, item: WorkItem) -> None:
        raise TimeoutError("nats: timeout")


def commands(node: Node, store: TaskStore, snapshots: Any = None, queue: Any = None) -> SnapshotCommands:
    ops = SimpleNamespace(snapshots=snapshots or SimpleNamespace(get=_no_op), root_disk=_no_op)
    return SnapshotCommands(KnownVms(), ops, store, node.leases(), queue or node.queue)  # type: ignore[arg-type]


async def _no_op(*args: Any) -> None:
    return None


def recording(node: Node, **options: Any) -> RecordingStore:
    return RecordingStore(node.store._kv, node.store._publisher, node.name, **options)


CUT_AFTER_THE_WRITE = [
    (TimeoutError("nats: timeout"), "nats: timeout"),  # the write landed, its answer was lost
    (asyncio.CancelledError(), "the command's deadline passed"),  # the 2 s deadline cut the handler there
]


@pytest.mark.parametrize(("cut", "reason"), CUT_AFTER_THE_WRITE, ids=["lost answer", "deadline"])
async def test_a_task_written_just_before_a_failure_is_failed_and_frees_the_vm(
    node: Node, cut: BaseException, reason: str,
) -> None:
    store = recording(node, after_write=cut)
    with pytest.raises(type(cut)):
        await commands(node, store).create(CreateRequest(vm="vm1", name="a"))
    [task_id] = store.written
    task = await node.task(task_id)
    assert (task.status, task.error) == ("failed", f"the task could not be queued: {reason}")
    assert await node.lease("vm1") is None


async def test_the_vm_is_freed_even_when_the_failed_task_cannot_be_marked(node: Node) -> None:
    store = recording(node, updates_fail=True)
    with pytest.raises(TimeoutError):
        await commands(node, store, queue=BrokenQueue()).create(CreateRequest(vm="vm1", name="a"))
    assert len(store.written) == 1 and await node.lease("vm1") is None


async def test_a_name_taken_while_the_command_waited_for_the_lease_is_409(node: Node) -> None:
    store = recording(node)
    with pytest.raises(Conflict) as taken:
        await commands(node, store, NameTakenMeanwhile()).create(CreateRequest(vm="vm1", name="a"))
    assert (taken.value.field, store.written) == ("name", [])
    assert await node.lease("vm1") is None
