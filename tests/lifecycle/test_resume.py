"""A lifecycle task cut by a restart is resumed from libvirt's real state and ends succeeded (or fails
with the real reason), keeping its id and started_at.

The cut is made as a SIGKILL leaves it: the task `running` in the bucket, its lease naming a process that
no longer exists. The domains live on `test:///default`, which this test holds open across the restart
(the driver's state lives as long as one connection of the process does), so the restarted service finds
them as a killed service would find its domains on qemu:///system.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import libvirt
import pytest
from nats.aio.client import Client as NATS

from edgevm.cli.natsserver import NatsServer
from edgevm.lifecycle.intents import KeptRequests
from edgevm.shared.bus import LOCKS, TASKS, ensure_jetstream
from edgevm.shared.commands import TaskReply
from edgevm.shared.errors import RemoteError
from edgevm.shared.locks import VmLocks, process_instance
from edgevm.shared.objects import Image, Task, Vm
from edgevm.shared.publisher import EventPublisher
from edgevm.shared.tasks import TaskStore
from tests.helpers import eventually
from tests.lifecycle.conftest import Node, start_node
from tests.lifecycle.test_lifecycle_breadth import import_image, wait_task

SHUTOFF = libvirt.VIR_DOMAIN_SHUTOFF
RUNNING = libvirt.VIR_DOMAIN_RUNNING


@pytest.fixture
def shared_driver() -> Iterator[libvirt.virConnect]:
    """A connection that keeps test:///default's domains alive while the service restarts."""
    conn = libvirt.open("test:///default")
    try:
        yield conn
    finally:
        conn.close()


def dead_holder() -> str:
    """A lease holder naming a process of this host that has exited (as a SIGKILLed lifecycle)."""
    child = subprocess.Popen(["true"])
    child.wait()
    boot, ns, _, tag = process_instance().split(".")
    return f"{boot}.{ns}.{child.pid}.{tag}"


async def cut_task(nc: NATS, node: Node, kind: str, vm: str | None) -> Task:
    """Write `kind` on `vm` as a killed lifecycle leaves it: running, its lease held by a dead process."""
    buckets = await ensure_jetstream(nc.jetstream())
    store = TaskStore(buckets[TASKS.name], EventPublisher(nc.jetstream(), node.config.node, "lifecycle"),
                      node.config.node)
    task, revision = await store.create(kind, vm)
    task, _ = await store.update(task, revision, status="running")
    if vm is not None:
        locks = VmLocks(buckets[LOCKS.name], node.config.node, "lifecycle")
        await locks.acquire(vm, kind, task.id, holder=dead_holder())
    return task


def domain_state(conn: libvirt.virConnect, vm: str) -> int | None:
    try:
        return int(conn.lookupByName(f"edgevm-{vm}").state()[0])
    except libvirt.libvirtError:
        return None


@pytest.mark.parametrize(("kind", "running_before", "domain_after", "state_after"), [
    ("vm.stop", True, SHUTOFF, "stopped"),
    ("vm.start", False, RUNNING, "running"),
    ("vm.restart", True, RUNNING, "running"),
    ("vm.delete", True, None, None),
])
async def test_a_cut_vm_task_is_resumed_and_succeeds(
    nats_server: NatsServer, nc: NATS, shared_driver: libvirt.virConnect, kind: str, running_before: bool,
    domain_after: int | None, state_after: str | None,
) -> None:
    node = await start_node(nats_server, nc, uri="test:///default")
    vm = f"r{secrets.token_hex(3)}"
    try:
        await import_image(node)
        await node.client.call("vm.create", {"name": vm, "image": "base", "stop_timeout": 5}, Vm)
        if running_before:
            started = await wait_task(node, await node.client.call("vm.start", {"name": vm}, TaskReply))
            assert started.status == "succeeded", started.error
    finally:
        await node.shutdown()
    cut = await cut_task(nc, node, kind, vm)
    again = await start_node(nats_server, nc, uri="test:///default", state=node.config.state_dir,
                             node=node.config.node)
    try:
        task = await wait_task(again, {"task": {"id": cut.id}})
        assert task.status == "succeeded", task.error
        assert (task.id, task.started_at) == (cut.id, cut.started_at)
        assert domain_state(shared_driver, vm) == domain_after
        if state_after is None:
            with pytest.raises(RemoteError) as info:
                await again.client.call("vm.get", {"name": vm})
            assert info.value.code == "404"
            assert not (again.config.state_dir / "lifecycle" / "vms" / vm).exists()
        else:
            assert (await again.client.call("vm.get", {"name": vm}, Vm)).status.state == state_after
            # The lease went with the task's end: the VM takes the next command at once.
            stop = await wait_task(again, await again.client.call("vm.stop", {"name": vm, "force": True},
                                                                  TaskReply))
            assert stop.status == "succeeded", stop.error
    finally:
        remove_domain(shared_driver, vm)
        await again.shutdown()


def remove_domain(driver: libvirt.virConnect, vm: str) -> None:
    """Destroy and undefine VM `vm`'s domain when it is there (a test's cleanup)."""
    if domain_state(driver, vm) is not None:
        domain = driver.lookupByName(f"edgevm-{vm}")
        if domain.isActive():
            domain.destroy()
        domain.undefine()


async def test_a_cut_image_import_with_no_kept_request_fails_saying_to_import_again(
        nats_server: NatsServer, nc: NATS) -> None:
    """An import accepted by a version that kept no request: today's behaviour, said plainly."""
    node = await start_node(nats_server, nc)
    await node.shutdown()
    cut = await cut_task(nc, node, "image.import", None)
    again = await start_node(nats_server, nc, state=node.config.state_dir, node=node.config.node)
    try:
        task = await wait_task(again, {"task": {"id": cut.id}})
        assert task.status == "failed"
        assert "request was not kept" in (task.error or "") and "import the image again" in (task.error or "")
        assert task.started_at == cut.started_at
    finally:
        await again.shutdown()


def requests_of(node: Node) -> KeptRequests:
    """The kept requests of `node`, read and written by the code the service uses."""
    return KeptRequests(node.config.state_dir / "lifecycle" / "requests")


async def no_request_left(node: Node) -> None:
    """Wait until no request is kept: it goes right after its task's end is written (seen a moment earlier)."""
    root = requests_of(node).root

    async def gone() -> bool:
        return not root.exists() or not list(root.iterdir())

    await eventually(gone, timeout=10, what="the kept requests are removed")


async def cut_import(nc: NATS, node: Node, name: str, source: str) -> Task:
    """An import cut mid-copy, as a SIGKILL leaves it: its task running, its request kept, its name marked, a
    partial copy in the store."""
    cut = await cut_task(nc, node, "image.import", None)
    requests_of(node).keep(cut.id, "image.import", {"name": name, "path": source, "guest_os": "linux",
                                                     "format": None})
    lifecycle = node.config.state_dir / "lifecycle"
    (lifecycle / "importing").mkdir(exist_ok=True)
    (lifecycle / "importing" / name).touch()
    (lifecycle / "images" / f".{name}.x1y2z3.part").write_bytes(b"half a copy")
    return cut


def image_files(node: Node) -> list[str]:
    return sorted(p.name for p in (node.config.state_dir / "lifecycle" / "images").iterdir())


async def test_a_cut_image_import_is_copied_again_from_its_source(nats_server: NatsServer, nc: NATS) -> None:
    node = await start_node(nats_server, nc)
    node.make_image_file("disk.qcow2", "16M")
    await node.shutdown()
    cut = await cut_import(nc, node, "disk", "disk.qcow2")
    again = await start_node(nats_server, nc, state=node.config.state_dir, node=node.config.node)
    try:
        task = await wait_task(again, {"task": {"id": cut.id}})
        assert task.status == "succeeded", task.error
        assert (task.id, task.started_at) == (cut.id, cut.started_at)
        assert task.result is not None and task.result["name"] == "disk" and task.result["format"] == "qcow2"
        assert image_files(again) == ["disk.qcow2"]  # the partial copy went, the whole one is in place
        assert (await again.client.call("image.get", {"name": "disk"}, Image)).sha256 == task.result["sha256"]
        vm = await again.client.call("vm.create", {"name": "on-it", "image": "disk"}, Vm)
        assert vm.status.state == "defined"
        assert not list((again.config.state_dir / "lifecycle" / "importing").iterdir())
        await no_request_left(again)
    finally:
        await again.shutdown()


async def test_a_cut_import_whose_source_went_meanwhile_fails_naming_it(nats_server: NatsServer, nc: NATS) -> None:
    node = await start_node(nats_server, nc)
    source = node.make_image_file("gone.qcow2", "16M")
    await node.shutdown()
    cut = await cut_import(nc, node, "gone", "gone.qcow2")
    source.unlink()  # while the service is down
    again = await start_node(nats_server, nc, state=node.config.state_dir, node=node.config.node)
    try:
        task = await wait_task(again, {"task": {"id": cut.id}})
        assert task.status == "failed"
        assert "'gone.qcow2' does not exist" in (task.error or "") and "resumed" in (task.error or ""), task.error
        assert image_files(again) == []
        with pytest.raises(RemoteError) as info:
            await again.client.call("image.get", {"name": "gone"})
        assert info.value.code == "404"
        # the name is free again
        again.make_image_file("gone.qcow2", "16M")
        redo = await wait_task(again, await again.client.call("image.import", {"name": "gone", "path": "gone.qcow2"},
                                                              TaskReply))
        assert redo.status == "succeeded", redo.error
        await no_request_left(again)  # each request went with its task's end
    finally:
        await again.shutdown()


async def test_a_torn_kept_request_fails_its_task_and_the_service_starts(nats_server: NatsServer, nc: NATS) -> None:
    node = await start_node(nats_server, nc)
    node.make_image_file("torn.qcow2", "16M")
    await node.shutdown()
    cut = await cut_import(nc, node, "torn", "torn.qcow2")
    kept = requests_of(node).root / f"{cut.id}.json"
    kept.write_bytes(kept.read_bytes()[:20])  # as a power loss may leave it
    ended = await cut_task(nc, node, "image.import", None)
    requests_of(node).keep(ended.id, "image.import", {"name": "x", "path": "torn.qcow2"})
    buckets = await ensure_jetstream(nc.jetstream())
    store = TaskStore(buckets[TASKS.name], EventPublisher(nc.jetstream(), node.config.node, "lifecycle"),
                      node.config.node)
    current, revision = await store.get(ended.id)
    await store.update(current, revision, status="succeeded", message="done")  # ended; its file was left
    again = await start_node(nats_server, nc, state=node.config.state_dir, node=node.config.node)
    try:
        task = await wait_task(again, {"task": {"id": cut.id}})
        assert task.status == "failed"
        assert f"kept in {kept}, cannot be read" in (task.error or "") and "import the image again" in (task.error or "")
        assert image_files(again) == []
        assert not (requests_of(again).root / f"{ended.id}.json").exists()  # swept at start-up: its task ended
        await no_request_left(again)
        redo = await wait_task(again, await again.client.call("image.import", {"name": "torn", "path": "torn.qcow2"},
                                                              TaskReply))
        assert redo.status == "succeeded", redo.error
    finally:
        await again.shutdown()


async def stop_cut_on_a_running_vm(nats_server: NatsServer, nc: NATS, vm: str) -> tuple[Node, Task]:
    """A VM that runs, and a vm.stop of it cut before it did anything (its service gone, as a SIGKILL leaves
    it); its kept request, if any, is the test's to write."""
    node = await start_node(nats_server, nc, uri="test:///default")
    try:
        await import_image(node)
        await node.client.call("vm.create", {"name": vm, "image": "base", "stop_timeout": 5}, Vm)
        started = await wait_task(node, await node.client.call("vm.start", {"name": vm}, TaskReply))
        assert started.status == "succeeded", started.error
    finally:
        await node.shutdown()
    return node, await cut_task(nc, node, "vm.stop", vm)


@pytest.mark.parametrize(("kept", "forced", "reason"), [
    ('{"kind": "vm.stop", "request": {"force": true}}', True, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED),
    (None, False, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN),  # a graceful stop keeps no request
    ('{"kind": "vm.stop", "requ', None, None),  # torn: whether it was forced is not known
])
async def test_a_cut_stop_is_resumed_as_asked(nats_server: NatsServer, nc: NATS, shared_driver: libvirt.virConnect,
                                              kept: str | None, forced: bool | None, reason: int | None) -> None:
    vm = f"f{secrets.token_hex(3)}"
    node, cut = await stop_cut_on_a_running_vm(nats_server, nc, vm)
    if kept is not None:
        requests_of(node).root.mkdir(parents=True, exist_ok=True)
        (requests_of(node).root / f"{cut.id}.json").write_text(kept)
    again = await start_node(nats_server, nc, uri="test:///default", state=node.config.state_dir,
                             node=node.config.node)
    try:
        task = await wait_task(again, {"task": {"id": cut.id}})
        if forced is None:
            assert task.status == "failed"
            assert "cannot be read" in (task.error or "") and "stop the VM again" in (task.error or ""), task.error
            assert domain_state(shared_driver, vm) == RUNNING  # nothing was done that was not asked
            task = await wait_task(again, await again.client.call("vm.stop", {"name": vm, "force": True}, TaskReply))
            forced, reason = True, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED
        assert task.status == "succeeded", task.error
        assert task.result == {"forced": forced}
        assert shared_driver.lookupByName(f"edgevm-{vm}").state() == [SHUTOFF, reason]
        await no_request_left(again)  # a request goes with its task's end
    finally:
        remove_domain(shared_driver, vm)
        await again.shutdown()


async def test_a_cut_create_is_swept_and_a_directory_never_marked_is_left_alone(
    nats_server: NatsServer, nc: NATS
) -> None:
    node = await start_node(nats_server, nc)
    await import_image(node)
    await node.shutdown()
    vms = node.config.state_dir / "lifecycle" / "vms"
    (vms / "cut").mkdir(parents=True)
    (vms / "cut" / "root.qcow2").write_text("half made")
    (node.config.state_dir / "lifecycle" / "creating").mkdir()
    (node.config.state_dir / "lifecycle" / "creating" / "cut").touch()  # as vm.create leaves it when killed
    (vms / "mine").mkdir()
    (vms / "mine" / "notes").write_text("a user's file")
    again = await start_node(nats_server, nc, state=node.config.state_dir, node=node.config.node)
    try:
        assert not (vms / "cut").exists()
        assert (await again.client.call("vm.create", {"name": "cut", "image": "base"}, Vm)).status.state == "defined"
        assert not (node.config.state_dir / "lifecycle" / "creating" / "cut").exists()
        with pytest.raises(RemoteError) as info:
            await again.client.call("vm.create", {"name": "mine", "image": "base"})
        assert info.value.code == "409" and "by hand" in info.value.message
        assert (vms / "mine" / "notes").read_text() == "a user's file"
    finally:
        await again.shutdown()
