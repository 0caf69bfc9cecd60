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
from edgevm.shared.bus import LOCKS, TASKS, ensure_jetstream
from edgevm.shared.commands import TaskReply
from edgevm.shared.errors import RemoteError
from edgevm.shared.locks import VmLocks, process_instance
from edgevm.shared.objects import Task, Vm
from edgevm.shared.publisher import EventPublisher
from edgevm.shared.tasks import TaskStore
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
        if domain_state(shared_driver, vm) is not None:
            domain = shared_driver.lookupByName(f"edgevm-{vm}")
            if domain.isActive():
                domain.destroy()
            domain.undefine()
        await again.shutdown()


async def test_a_cut_image_import_fails_saying_to_import_again(nats_server: NatsServer, nc: NATS) -> None:
    node = await start_node(nats_server, nc)
    await node.shutdown()
    cut = await cut_task(nc, node, "image.import", None)
    again = await start_node(nats_server, nc, state=node.config.state_dir, node=node.config.node)
    try:
        task = await wait_task(again, {"task": {"id": cut.id}})
        assert task.status == "failed"
        assert "import the image again" in (task.error or ""), task.error
        assert task.started_at == cut.started_at
    finally:
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
