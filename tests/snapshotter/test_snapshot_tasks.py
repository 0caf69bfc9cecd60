"""snapshot.* over real NATS on libvirt's test driver: tasks, events, the tree, errors, cancel, the lease."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import libvirt
import msgspec
import pycdlib
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy

from edgevm.cli.natsserver import NatsServer
from edgevm.shared import subjects
from edgevm.shared.bus import LOCKS, SNAPSHOT_WORK_STREAM, ensure_jetstream
from edgevm.shared.commands import SnapshotList, TaskList, TaskReply
from edgevm.shared.errors import RemoteError
from edgevm.shared.events import TaskUpdated, decode_event
from edgevm.shared.ids import new_id
from edgevm.shared.locks import VmLocks
from edgevm.shared.objects import Task
from edgevm.snapshotter.app import MAX_WORKERS, workers_from_env
from edgevm.snapshotter.workqueue import WorkItem, WorkQueue
from tests.helpers import eventually
from tests.lifecycle.conftest import start_node
from tests.lifecycle.test_lifecycle_breadth import import_image, wait_task
from tests.snapshotter.conftest import SHARED_TEST_URI, Pair, start_snapshotter, unique


async def make_vm(pair: Pair, prefix: str = "web", firmware: str = "bios", start: bool = False) -> str:
    name = unique(prefix)
    if "base" not in [i["name"] for i in (await pair.client.call("image.list"))["images"]]:
        await import_image(pair.node)
    await pair.client.call("vm.create", {"name": name, "image": "base", "firmware": firmware, "memory": "128MB"})
    if start:
        task = await wait_task(pair.node, await pair.client.call("vm.start", {"name": name}, TaskReply))
        assert task.status == "succeeded", task.error
    return name


async def run(pair: Pair, verb: str, body: dict[str, Any]) -> Task:
    """Submit a snapshot command and wait for its task to end."""
    reply = await pair.client.call(verb, body, TaskReply)
    assert reply.task.status == "queued" and reply.task.kind == verb
    return await wait_task(pair.node, reply)


async def tree(pair: Pair, vm: str) -> dict[str, tuple[str | None, bool]]:
    """name -> (parent, current) of every snapshot of the VM."""
    listed = await pair.client.call("snapshot.list", {"vm": vm}, SnapshotList)
    return {s.name: (s.parent, s.current) for s in listed.snapshots}


async def expect_error(pair: Pair, verb: str, body: dict, code: str, field: str | None) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        await pair.client.call(verb, body)
    assert (info.value.code, info.value.field) == (code, field), info.value.message
    return info.value


async def test_internal_snapshots_form_a_tree_that_restore_and_delete_keep(pair: Pair) -> None:
    vm = await make_vm(pair, start=True)
    for name in ("a", "b", "c"):
        task = await run(pair, "snapshot.create", {"vm": vm, "name": name, "description": f"snap {name}"})
        assert task.status == "succeeded", task.error
        assert task.result is not None
        assert (task.result["name"], task.result["mode"], task.result["vm_state"]) == (name, "internal", "running")
    assert await tree(pair, vm) == {"a": (None, False), "b": ("a", False), "c": ("b", True)}
    listed = (await pair.client.call("snapshot.list", {"vm": vm}, SnapshotList)).snapshots
    assert [s.description for s in listed] == ["snap a", "snap b", "snap c"]

    restored = await run(pair, "snapshot.restore", {"vm": vm, "name": "a"})
    assert restored.status == "succeeded", restored.error
    assert restored.result is not None and restored.result["current"] is True
    assert await tree(pair, vm) == {"a": (None, True), "b": ("a", False), "c": ("b", False)}

    deleted = await run(pair, "snapshot.delete", {"vm": vm, "name": "b"})
    assert deleted.status == "succeeded", deleted.error
    assert await tree(pair, vm) == {"a": (None, True), "c": ("a", False)}
    again = await run(pair, "snapshot.restore", {"vm": vm, "name": "c"})
    assert again.status == "succeeded", again.error
    assert await tree(pair, vm) == {"a": (None, False), "c": ("a", True)}

    # The VM's tasks, newest first, snapshot tasks among the lifecycle's.
    tasks = (await pair.client.call("task.list", {"vm": vm}, TaskList)).tasks
    assert [t.kind for t in tasks] == ["snapshot.restore", "snapshot.delete", "snapshot.restore"] + [
        "snapshot.create"] * 3 + ["vm.start"]
    assert all(t.status == "succeeded" for t in tasks)
    assert [t.id for t in tasks] == sorted((t.id for t in tasks), reverse=True)


async def test_a_stopped_vm_gets_a_snapshot_without_memory(pair: Pair) -> None:
    vm = await make_vm(pair)
    task = await run(pair, "snapshot.create", {"vm": vm, "name": "cold"})
    assert task.status == "succeeded", task.error
    assert task.result is not None and (task.result["vm_state"], task.result["mode"]) == ("stopped", "internal")


BAD_REQUESTS = [
    ("snapshot.create", {"vm": "x", "name": "Bad Name"}, "name"),
    ("snapshot.create", {"vm": "x", "name": "ok", "mode": "internal"}, "mode"),
    ("snapshot.create", {"name": "ok"}, "vm"),
    ("snapshot.create", {"vm": "x", "name": "ok", "description": "d" * 1025}, "description"),
    ("snapshot.restore", {"vm": "x"}, "name"),
    ("snapshot.delete", {"vm": "-x", "name": "a"}, "vm"),
    ("snapshot.list", {}, "vm"),
]


@pytest.mark.parametrize(("verb", "body", "field"), BAD_REQUESTS)
async def test_bad_requests_are_400_naming_the_field_and_change_nothing(
    pair: Pair, verb: str, body: dict, field: str
) -> None:
    before = (await pair.client.call("task.list", {}, TaskList)).tasks
    await expect_error(pair, verb, body, "400", field)
    assert (await pair.client.call("task.list", {}, TaskList)).tasks == before


async def test_unknown_vm_and_snapshot_are_404_a_taken_name_409(pair: Pair) -> None:
    vm = await make_vm(pair)
    await expect_error(pair, "snapshot.create", {"vm": "ghost", "name": "a"}, "404", "vm")
    await expect_error(pair, "snapshot.list", {"vm": "ghost"}, "404", "vm")
    await expect_error(pair, "snapshot.restore", {"vm": vm, "name": "nope"}, "404", "name")
    await expect_error(pair, "snapshot.delete", {"vm": vm, "name": "nope"}, "404", "name")
    assert (await run(pair, "snapshot.create", {"vm": vm, "name": "a"})).status == "succeeded"
    await expect_error(pair, "snapshot.create", {"vm": vm, "name": "a"}, "409", "name")
    assert [t.kind for t in (await pair.client.call("task.list", {"vm": vm}, TaskList)).tasks] == ["snapshot.create"]


async def test_a_vm_without_a_disk_of_its_own_is_422(pair: Pair) -> None:
    iso = pycdlib.PyCdlib()
    iso.new(vol_ident="LIVE")
    pair.node.import_dir.mkdir(parents=True, exist_ok=True)
    iso.write(str(pair.node.import_dir / "live.iso"))
    iso.close()
    task = await wait_task(pair.node, await pair.client.call(
        "image.import", {"name": "live", "path": "live.iso", "format": "iso"}, TaskReply))
    assert task.status == "succeeded", task.error
    vm = unique("live")
    await pair.client.call("vm.create", {"name": vm, "image": "live", "memory": "128MB"})
    error = await expect_error(pair, "snapshot.create", {"vm": vm, "name": "a"}, "422", "vm")
    assert "ISO" in error.message


async def test_task_events_come_in_order_and_replay_for_a_late_subscriber(pair: Pair, nc: NATS) -> None:
    vm = await make_vm(pair)
    task = await run(pair, "snapshot.create", {"vm": vm, "name": "ev"})
    assert task.status == "succeeded"
    # Subscribed only now: JetStream keeps the task's events from the start.
    js = nc.jetstream()
    subject = subjects.event(pair.node.config.node, f"task.{task.id}")
    sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    statuses = []
    try:
        while not statuses or statuses[-1] not in ("succeeded", "failed"):
            msg = await sub.next_msg(timeout=5)
            event = decode_event(msg.data)
            assert isinstance(event, TaskUpdated)
            if not statuses or statuses[-1] != event.task.status:
                statuses.append(event.task.status)
    finally:
        await sub.unsubscribe()
    assert statuses == ["queued", "running", "succeeded"]


async def test_a_queued_task_holds_the_vm_and_a_cancelled_one_never_runs(
    pair: Pair, nats_server: NatsServer, nc: NATS
) -> None:
    # A second node whose snapshotter has no workers: its tasks stay queued until workers come.
    node = await start_node(nats_server, nc, uri=SHARED_TEST_URI)
    idle = await start_snapshotter(nc, node.config, workers=0)
    other = Pair(node, idle)
    try:
        vm = await make_vm(other, start=True)
        reply = await other.client.call("snapshot.create", {"vm": vm, "name": "never"}, TaskReply)
        task_id = reply.task.id
        # The lease is the VM's, whichever service asks: vm.stop is refused naming the task.
        busy = await expect_error(other, "vm.stop", {"name": vm}, "409", "name")
        assert task_id in busy.message and "snapshot.create" in busy.message
        busy = await expect_error(other, "snapshot.create", {"vm": vm, "name": "other"}, "409", "vm")
        assert task_id in busy.message

        cancelled = await other.client.call("task.cancel", {"id": task_id}, Task)
        assert cancelled.status == "cancelled"
        workers = await start_snapshotter(nc, node.config, workers=1)
        try:
            async def vm_free() -> bool:
                locks = (await ensure_jetstream(nc.jetstream()))[LOCKS.name]
                holder = await VmLocks(locks, node.config.node, "snapshotter").holder(vm)  # None: no lease
                return holder is None or holder.task_id != task_id

            await eventually(vm_free, timeout=20, what="the cancelled task's lease released")
            stopped = await wait_task(node, await other.client.call("vm.stop", {"name": vm, "force": True}, TaskReply))
            assert stopped.status == "succeeded", stopped.error
            task = await other.client.call("task.get", {"id": task_id}, Task)
            assert (task.status, task.started_at) == ("cancelled", None)
            assert await tree(other, vm) == {}
        finally:
            await workers.shutdown()
    finally:
        await idle.shutdown()
        await node.shutdown()


async def test_a_work_item_published_twice_is_kept_once(nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_jetstream(js)
    node = unique("dedupe")
    queue = WorkQueue(js, node)
    item = WorkItem(new_id(), "snapshot.create", "vm", "a")
    await queue.enqueue(item)
    await queue.enqueue(item)  # the same task's item again (a publish whose answer was lost, sent again)
    sub = await js.pull_subscribe(subjects.snapshot_work(node), stream=SNAPSHOT_WORK_STREAM.name,
                                  config=ConsumerConfig(filter_subject=subjects.snapshot_work(node)))
    try:
        first = await sub.fetch(5, timeout=1)
        assert [msgspec.json.decode(m.data, type=WorkItem) for m in first] == [item]
        for msg in first:
            await msg.ack()
        with pytest.raises(asyncio.TimeoutError):
            await sub.fetch(1, timeout=0.5)
    finally:
        await sub.unsubscribe()


async def test_a_request_sent_again_with_its_request_id_gets_the_same_task(pair: Pair) -> None:
    vm = await make_vm(pair)
    body = {"vm": vm, "name": "once", "request_id": "req-1"}
    first = await pair.client.call("snapshot.create", body, TaskReply)
    again = await pair.client.call("snapshot.create", body, TaskReply)  # the reply was lost: sent again
    assert again.task.id == first.task.id
    assert (await wait_task(pair.node, first)).status == "succeeded"
    late = await pair.client.call("snapshot.create", body, TaskReply)  # after the task ended, too
    assert late.task.id == first.task.id and late.task.status == "succeeded"
    # The same id names another request of another kind; without an id every request is a new one.
    restore = await run(pair, "snapshot.restore", {"vm": vm, "name": "once", "request_id": "req-1"})
    assert restore.id != first.task.id and restore.status == "succeeded"
    kinds = [t.kind for t in (await pair.client.call("task.list", {"vm": vm}, TaskList)).tasks]
    assert kinds == ["snapshot.restore", "snapshot.create"]
    await expect_error(pair, "snapshot.create", {"vm": vm, "name": "x", "request_id": "not ok!"}, "400",
                       "request_id")


async def test_a_queued_task_fails_with_its_reason_when_the_snapshots_changed_before_it_ran(
    pair: Pair, nats_server: NatsServer, nc: NATS
) -> None:
    node = await start_node(nats_server, nc, uri=SHARED_TEST_URI)
    idle = await start_snapshotter(nc, node.config, workers=0)
    other = Pair(node, idle)
    conn = libvirt.open(SHARED_TEST_URI)
    try:
        taken, gone = await make_vm(other), await make_vm(other)
        create = await other.client.call("snapshot.create", {"vm": taken, "name": "x"}, TaskReply)
        domain = conn.lookupByName(f"edgevm-{gone}")
        domain.snapshotCreateXML("<domainsnapshot><name>y</name></domainsnapshot>", 0)
        restore = await other.client.call("snapshot.restore", {"vm": gone, "name": "y"}, TaskReply)
        # Behind the queued tasks' backs: the name is taken by another snapshot, the snapshot is deleted.
        conn.lookupByName(f"edgevm-{taken}").snapshotCreateXML("<domainsnapshot><name>x</name></domainsnapshot>", 0)
        domain.snapshotLookupByName("y").delete(0)
        workers = await start_snapshotter(nc, node.config, workers=2)
        try:
            created, restored = await wait_task(node, create), await wait_task(node, restore)
        finally:
            await workers.shutdown()
        assert created.status == "failed" and created.error == f"VM {taken} has a snapshot named x already"
        assert restored.status == "failed" and restored.error and "y" in restored.error, restored
    finally:
        conn.close()
        await idle.shutdown()
        await node.shutdown()


WORKER_SETTINGS = [("", 2), ("0", 0), (" 3 ", 3), (str(MAX_WORKERS), MAX_WORKERS)]


@pytest.mark.parametrize(("raw", "count"), WORKER_SETTINGS)
def test_the_worker_count_comes_from_the_environment(raw: str, count: int) -> None:
    assert workers_from_env({"EDGEVM_SNAPSHOT_WORKERS": raw}) == count


@pytest.mark.parametrize("raw", ["two", "-1", "1.5", str(MAX_WORKERS + 1)])
def test_a_bad_worker_count_stops_the_service_with_one_sentence(raw: str) -> None:
    with pytest.raises(ValueError, match="EDGEVM_SNAPSHOT_WORKERS must be a whole number"):
        workers_from_env({"EDGEVM_SNAPSHOT_WORKERS": raw})


def test_the_service_refuses_a_bad_worker_count_without_a_traceback() -> None:
    done = subprocess.run([sys.executable, "-m", "edgevm.snapshotter"], capture_output=True, text=True,
                          env={"EDGEVM_SNAPSHOT_WORKERS": "lots", "PATH": "/usr/bin:/bin"}, timeout=30)
    assert done.returncode == 1
    assert done.stderr.strip() == ("edgevm-snapshotter: EDGEVM_SNAPSHOT_WORKERS must be a whole number from 0 "
                                   f"to {MAX_WORKERS}, not 'lots'")
