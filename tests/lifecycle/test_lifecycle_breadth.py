"""Every lifecycle command and error code over real NATS, on libvirt's test driver."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from edgevm.cli.natsserver import NatsServer
from edgevm.shared import subjects
from edgevm.shared.bus import LOCKS, TASKS, ensure_jetstream
from edgevm.shared.commands import ImageList, TaskList, TaskReply, VmList
from edgevm.shared.errors import RemoteError
from edgevm.shared.ids import new_id
from edgevm.shared.locks import VmLocks
from edgevm.shared.objects import Image, Task, Vm
from edgevm.shared.publisher import EventPublisher
from edgevm.shared.tasks import TaskStore
from tests.helpers import EventCollector, eventually
from tests.lifecycle.conftest import Node, start_node


async def wait_task(node: Node, reply: TaskReply | dict, timeout: float = 30) -> Task:
    task_id = reply.task.id if isinstance(reply, TaskReply) else reply["task"]["id"]

    async def done() -> Task | None:
        task = await node.client.call("task.get", {"id": task_id}, Task)
        return task if task.finished else None

    return await eventually(done, timeout=timeout, what=f"task {task_id} ends")


async def import_image(node: Node, name: str = "base", fmt: str = "qcow2", guest_os: str = "linux") -> Image:
    node.make_image_file(f"{name}.{fmt}", fmt=fmt)
    body = {"name": name, "path": f"{name}.{fmt}", "guest_os": guest_os}
    reply = await node.client.call("image.import", body, TaskReply)
    task = await wait_task(node, reply)
    assert task.status == "succeeded", task.error
    return Image(**task.result)  # type: ignore[arg-type]


async def expect_error(node: Node, verb: str, body: dict, code: str, field: str | None = None) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        await node.client.call(verb, body)
    assert info.value.code == code, info.value.message
    if field is not None:
        assert info.value.field == field, info.value.message
    return info.value


async def test_images_import_list_get_delete(node: Node) -> None:
    image = await import_image(node)
    assert image.format == "qcow2" and len(image.sha256) == 64 and image.size_bytes > 0
    listed = await node.client.call("image.list", {}, ImageList)
    assert [i.name for i in listed.images] == ["base"]
    assert (await node.client.call("image.get", {"name": "base"}, Image)).sha256 == image.sha256
    await expect_error(node, "image.import", {"name": "base", "path": "base.qcow2"}, "409", "name")
    await expect_error(node, "image.import", {"name": "x", "path": "/etc/passwd"}, "400", "path")
    await expect_error(node, "image.import", {"name": "x", "path": "../../etc/passwd"}, "400", "path")
    await expect_error(node, "image.get", {"name": "nope"}, "404", "name")
    await node.client.call("image.delete", {"name": "base"})
    await expect_error(node, "image.get", {"name": "base"}, "404")
    assert not (node.config.state_dir / "lifecycle" / "images" / "base.qcow2").exists()


async def test_vm_create_get_list_and_conflicts(node: Node, nc: NATS) -> None:
    await import_image(node)
    events = await EventCollector().start(nc, subjects.all_events(node.config.node))
    vm = await node.client.call("vm.create", {"name": "web", "image": "base", "memory": "256MB", "cpu": 1}, Vm)
    assert (vm.status.state, vm.status.revision, vm.spec.memory) == ("defined", 1, 256 * 1024**2)
    assert (await node.client.call("vm.get", {"name": "web"}, Vm)) == vm
    assert [v.spec.name for v in (await node.client.call("vm.list", {}, VmList)).vms] == ["web"]
    vm_dir = node.config.state_dir / "lifecycle" / "vms" / "web"
    assert (vm_dir / "root.qcow2").exists() and (vm_dir / "seed.iso").exists()
    await expect_error(node, "vm.create", {"name": "web", "image": "base"}, "409", "name")
    await expect_error(node, "vm.get", {"name": "ghost"}, "404", "name")
    await expect_error(node, "image.delete", {"name": "base"}, "409", "name")
    await eventually(lambda: _async(events.of_type("vm.created")), what="vm.created event")
    await events.stop()


async def _async(value: object) -> object:
    return value


BAD_CREATES = [
    ({"name": "a", "image": "missing"}, "image"),
    ({"name": "a", "image": "base", "memory": "100TiB"}, "memory"),
    ({"name": "a", "image": "base", "cpu": 0}, "cpu"),
    ({"name": "a", "image": "base", "cpu": 4096}, "cpu"),
    ({"name": "a", "image": "base", "volumes": [{"name": "d", "size": "1GB"}, {"name": "d", "size": "2GB"}]},
     "volumes[1].name"),
    ({"name": "a", "image": "base", "volumes": [{"name": "d", "source": "../../../etc/passwd"}]}, "volumes[0].source"),
    ({"name": "a", "image": "base", "volumes": [{"name": "d", "source": "no-such-image"}]}, "volumes[0].source"),
    ({"name": "a", "image": "base", "cloud_init": {"user_data": "#cloud-config\nusers: [unclosed\n"}},
     "cloud_init.user_data"),
    ({"name": "a", "image": "base", "cloud_init": {"user_data": "just text"}}, "cloud_init.user_data"),
]


async def test_bad_creates_are_400_and_create_nothing(node: Node) -> None:
    await import_image(node)
    for body, field in BAD_CREATES:
        error = await expect_error(node, "vm.create", body, "400", field)
        assert field.split("[")[0] in error.message
    assert (await node.client.call("vm.list", {}, VmList)).vms == []
    vms_dir = node.config.state_dir / "lifecycle" / "vms"
    assert not vms_dir.exists() or list(vms_dir.iterdir()) == []


async def test_a_node_without_netplumb_refuses_networks_with_422(node: Node) -> None:
    await import_image(node)
    for network in ({"vrf": "red"}, {"port_mappings": [{"host_interface": "lo", "host_port": 8080, "vm_port": 80}]}):
        error = await expect_error(node, "vm.create", {"name": "a", "image": "base", "network": network}, "422",
                                   "network")
        assert "EDGEVM_NETWORK=none" in error.message
    assert (await node.client.call("vm.list", {}, VmList)).vms == []
    created = await node.client.call("vm.create", {"name": "a", "image": "base", "network": {"vrf": "default"}}, Vm)
    assert created.spec.network.vrf == "default"


async def test_update_revisions_and_immutables(node: Node) -> None:
    await import_image(node)
    await node.client.call("vm.create", {"name": "u", "image": "base"}, Vm)
    await expect_error(node, "vm.update", {"name": "u", "revision": 7, "cpu": 2}, "409", "revision")
    await expect_error(node, "vm.update", {"name": "u", "revision": 1, "firmware": "uefi"}, "400", "firmware")
    await expect_error(node, "vm.update", {"name": "u", "revision": 1, "image": "other"}, "400", "image")
    await expect_error(node, "vm.update", {"name": "u", "revision": 1, "cpu": 0}, "400", "cpu")
    vm = await node.client.call("vm.update", {"name": "u", "revision": 1, "cpu": 2, "memory": "1GiB",
                                              "description": "bigger"}, Vm)
    assert (vm.status.revision, vm.spec.cpu, vm.spec.memory, vm.spec.description) == (2, 2, 1024**3, "bigger")
    await expect_error(node, "vm.update", {"name": "u", "revision": 1, "cpu": 1}, "409", "revision")
    same = await node.client.call("vm.update", {"name": "u", "revision": 2, "firmware": "bios"}, Vm)
    assert same.status.revision == 2  # an immutable field given unchanged changes nothing


async def test_power_tasks_events_and_recent_tasks(node: Node, nc: NATS) -> None:
    await import_image(node)
    events = await EventCollector().start(nc, subjects.all_events(node.config.node))
    await node.client.call("vm.create", {"name": "p", "image": "base", "stop_timeout": 1}, Vm)
    for verb, state in [("vm.start", "running"), ("vm.restart", "running"), ("vm.stop", "stopped"),
                        ("vm.start", "running")]:
        task = await wait_task(node, await node.client.call(verb, {"name": "p"}, TaskReply))
        assert (task.kind, task.status, task.vm) == (verb, "succeeded", "p"), task.error
        assert (await node.client.call("vm.get", {"name": "p"}, Vm)).status.state == state
    forced = await wait_task(node, await node.client.call("vm.stop", {"name": "p", "force": True}, TaskReply))
    assert forced.result == {"forced": True}
    tasks = (await node.client.call("task.list", {"vm": "p"}, TaskList)).tasks
    assert [t.kind for t in tasks] == ["vm.stop", "vm.start", "vm.stop", "vm.restart", "vm.start"]
    assert [t.id for t in tasks] == sorted((t.id for t in tasks), reverse=True)
    assert len((await node.client.call("task.list", {"vm": "p", "limit": 2}, TaskList)).tasks) == 2
    # Each task's events go queued -> running -> succeeded.
    first = tasks[-1].id
    statuses = [e.task.status for e in events.of_type("task.updated") if e.task.id == first]  # type: ignore[attr-defined]
    # A start that takes a millisecond writes no progress step and no `starting` state (coalesced).
    assert statuses == ["queued", "running", "succeeded"]
    states = [e.vm.status.state for _, e in events.events if e.__struct_config__.tag.startswith("vm.")]  # type: ignore[attr-defined]
    assert "starting" not in states and "stopping" not in states
    kinds = [e.__struct_config__.tag for _, e in events.events if e.__struct_config__.tag.startswith("vm.")]
    assert kinds.count("vm.started") == 3 and kinds.count("vm.stopped") >= 2
    deleted = await wait_task(node, await node.client.call("vm.delete", {"name": "p"}, TaskReply))
    assert deleted.status == "succeeded"
    await expect_error(node, "vm.get", {"name": "p"}, "404")
    assert not (node.config.state_dir / "lifecycle" / "vms" / "p").exists()
    await expect_error(node, "task.get", {"id": new_id()}, "404", "id")
    await expect_error(node, "task.cancel", {"id": deleted.id}, "409", "id")
    await expect_error(node, "task.get", {"id": "not-an-id"}, "400", "id")
    await events.stop()


async def test_busy_vm_answers_409_naming_the_running_task(node: Node, nc: NATS) -> None:
    await import_image(node)
    await node.client.call("vm.create", {"name": "b", "image": "base"}, Vm)
    js = nc.jetstream()
    buckets = await ensure_jetstream(js)
    locks = VmLocks(buckets[LOCKS.name], node.config.node, "snapshotter")
    held_by = new_id()
    async with locks.hold("b", "snapshot.create", held_by):
        for verb in ("vm.stop", "vm.start", "vm.delete"):
            error = await expect_error(node, verb, {"name": "b"}, "409", "name")
            assert held_by in error.message and "snapshot.create" in error.message
        await expect_error(node, "vm.update", {"name": "b", "revision": 1, "cpu": 2}, "409")
    task = await wait_task(node, await node.client.call("vm.start", {"name": "b"}, TaskReply))
    assert task.status == "succeeded"


async def test_task_cancel_of_a_queued_task_from_another_service(node: Node, nc: NATS) -> None:
    js = nc.jetstream()
    buckets = await ensure_jetstream(js)
    store = TaskStore(buckets[TASKS.name], EventPublisher(js, node.config.node, "snapshotter"), node.config.node)
    queued, _ = await store.create("snapshot.create", "some-vm")
    listed = await eventually(lambda: _listed(node, queued.id), what="task.list shows the snapshotter's task")
    assert listed.status == "queued"
    cancelled = await node.client.call("task.cancel", {"id": queued.id}, Task)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    stored, _ = await store.get(queued.id)
    assert stored.status == "cancelled"


async def _listed(node: Node, task_id: str) -> Task | None:
    tasks = (await node.client.call("task.list", {}, TaskList)).tasks
    return next((t for t in tasks if t.id == task_id), None)


async def test_restart_reconciles_missing_domains_and_resumes_interrupted_tasks(
    nats_server: NatsServer, nc: NATS, node: Node
) -> None:
    await import_image(node)
    await node.client.call("vm.create", {"name": "r", "image": "base"}, Vm)
    task = await wait_task(node, await node.client.call("vm.start", {"name": "r"}, TaskReply))
    assert task.status == "succeeded"
    js = nc.jetstream()
    buckets = await ensure_jetstream(js)
    store = TaskStore(buckets[TASKS.name], EventPublisher(js, node.config.node, "lifecycle"), node.config.node)
    stuck, revision = await store.create("vm.stop", "r")
    await store.update(stuck, revision, status="running")
    # Its lease, as a lifecycle killed mid-task leaves it (renewed no more, but 30 s from expiring).
    await VmLocks(buckets[LOCKS.name], node.config.node, "lifecycle").acquire("r", "vm.stop", stuck.id)
    await node.shutdown()
    # The restarted service opens a fresh private test driver, which has none of the old domains: it
    # defines them again from the records, and the VM that "ran" is stopped now.
    again = await start_node(nats_server, nc, state=node.config.state_dir, node=node.config.node)
    try:
        vm = await again.client.call("vm.get", {"name": "r"}, Vm)
        assert vm.status.state == "stopped"
        # The cut stop is resumed: its domain is gone with the old driver, so the VM is off and the stop done.
        resumed = await wait_task(again, {"task": {"id": stuck.id}})
        assert resumed.status == "succeeded", resumed.error
        # The resumed task's lease went with its end: no 409 naming a task that is over.
        task = await wait_task(again, await again.client.call("vm.start", {"name": "r"}, TaskReply))
        assert task.status == "succeeded", task.error
    finally:
        await again.shutdown()


async def test_update_grows_a_stopped_vms_disk_and_refuses_other_volume_changes(node: Node) -> None:
    await import_image(node)
    data = {"name": "data", "kind": "disk", "size": "32MB"}
    vm = await node.client.call("vm.create", {"name": "v", "image": "base", "volumes": [data]}, Vm)
    disk = node.config.state_dir / "lifecycle" / "vms" / "v" / "volume-data.qcow2"
    assert qemu_info(disk)["virtual-size"] == 32 << 20
    for change, field in (({"size": "16MB"}, "volumes[0].size"), ({"bus": "ide"}, "volumes[0].bus")):
        await expect_error(node, "vm.update", {"name": "v", "revision": vm.status.revision,
                                               "volumes": [{**data, **change}]}, "400", field)
    assert qemu_info(disk)["virtual-size"] == 32 << 20
    grown = await node.client.call("vm.update", {"name": "v", "revision": vm.status.revision,
                                                 "volumes": [{**data, "size": "64MB"}]}, Vm)
    assert grown.spec.volumes[0].size == 64 << 20 and grown.status.revision == vm.status.revision + 1
    assert qemu_info(disk)["virtual-size"] == 64 << 20


def qemu_info(path: Path) -> dict:
    import json
    import subprocess

    done = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, check=True)
    return json.loads(done.stdout)


async def test_auto_start_vms_that_ran_come_back_after_the_node_went_down(
    nats_server: NatsServer, nc: NATS, node: Node
) -> None:
    await import_image(node, guest_os="debian12")
    for name, auto in (("auto", True), ("manual", False), ("parked", True)):
        vm = await node.client.call("vm.create", {"name": name, "image": "base", "auto_start": auto}, Vm)
        assert vm.status.guest_os == "debian12"
        if auto:
            await eventually(lambda n=name: _state(node, n, "running"), what=f"{name} starts after create")
        else:
            assert (await wait_task(node, await node.client.call("vm.start", {"name": name}))).status == "succeeded"
    assert (await wait_task(node, await node.client.call("vm.stop", {"name": "parked"}))).status == "succeeded"
    await node.shutdown()
    # A fresh private test driver: like a host after a reboot, every domain is gone or off.
    again = await start_node(nats_server, nc, state=node.config.state_dir, node=node.config.node)
    try:
        await eventually(lambda: _state(again, "auto", "running"), what="the auto_start VM runs again")
        assert (await again.client.call("vm.get", {"name": "manual"}, Vm)).status.state == "stopped"
        assert (await again.client.call("vm.get", {"name": "parked"}, Vm)).status.state == "stopped"
    finally:
        await again.shutdown()


async def _state(node: Node, name: str, state: str) -> bool:
    return (await node.client.call("vm.get", {"name": name}, Vm)).status.state == state


async def test_auto_start_submits_a_start_task(node: Node) -> None:
    await import_image(node)
    await node.client.call("vm.create", {"name": "auto", "image": "base", "auto_start": True}, Vm)

    async def running() -> bool:
        return (await node.client.call("vm.get", {"name": "auto"}, Vm)).status.state == "running"

    await eventually(running, what="auto_start VM runs")
    assert Path(node.config.state_dir / "lifecycle" / "vms" / "auto" / "seed.iso").exists()
    [task] = (await node.client.call("task.list", {"vm": "auto"}, TaskList)).tasks
    assert (task.kind, task.status) == ("vm.start", "succeeded")


async def test_update_rules_are_400_and_dotted_image_names_survive_a_restart(
    nats_server: NatsServer, nc: NATS, node: Node
) -> None:
    await import_image(node, "deb-12.4")
    await node.client.call("vm.create", {"name": "v", "image": "deb-12.4"}, Vm)
    await expect_error(node, "vm.update", {"name": "v", "revision": 1, "hostname": "bad_host!"}, "400", "hostname")
    await expect_error(node, "vm.update", {"name": "v", "revision": 1, "memory": "1MB"}, "400", "memory")
    five_ide = [{"name": f"d{i}", "size": "1GB", "bus": "ide"} for i in range(5)]
    await expect_error(node, "vm.create", {"name": "w", "image": "deb-12.4", "volumes": five_ide}, "400", "volumes")
    await node.shutdown()
    again = await start_node(nats_server, nc, state=node.config.state_dir, node=node.config.node)
    try:
        assert [i.name for i in (await again.client.call("image.list", {}, ImageList)).images] == ["deb-12.4"]
    finally:
        await again.shutdown()


async def test_a_start_makes_again_a_seed_and_overlay_a_power_cut_tore(node: Node) -> None:
    await import_image(node)
    await node.client.call("vm.create", {"name": "torn", "image": "base"}, Vm)
    vm_dir = node.config.state_dir / "lifecycle" / "vms" / "torn"
    (vm_dir / "seed.iso").write_bytes(b"")
    (vm_dir / "root.qcow2").unlink()
    (vm_dir / "root.qcow2").write_bytes(b"QFI\xfb" + b"\0" * 100)
    task = await wait_task(node, await node.client.call("vm.start", {"name": "torn"}, TaskReply))
    assert task.status == "succeeded", task.error
    assert (vm_dir / "seed.iso").stat().st_size > 0
    assert qemu_info(vm_dir / "root.qcow2")["backing-filename"].endswith("base.qcow2")


async def test_create_never_takes_over_a_record_less_vm_directory(node: Node) -> None:
    await import_image(node)
    leftover = node.config.state_dir / "lifecycle" / "vms" / "old"
    leftover.mkdir(parents=True)
    (leftover / "root.qcow2").write_bytes(b"someone's data")
    error = await expect_error(node, "vm.create", {"name": "old", "image": "base"}, "409", "name")
    assert "by hand" in error.message
    assert (leftover / "root.qcow2").read_bytes() == b"someone's data"


async def test_update_changes_nothing_when_its_network_is_refused(node: Node) -> None:
    await import_image(node)
    data = {"name": "data", "kind": "disk", "size": "32MB"}
    vm = await node.client.call("vm.create", {"name": "u", "image": "base", "volumes": [data]}, Vm)
    disk = node.config.state_dir / "lifecycle" / "vms" / "u" / "volume-data.qcow2"
    await expect_error(node, "vm.update", {"name": "u", "revision": vm.status.revision, "network": {"vrf": "red"},
                                           "volumes": [{**data, "size": "64MB"}]}, "422", "network")
    assert qemu_info(disk)["virtual-size"] == 32 << 20
    assert (await node.client.call("vm.get", {"name": "u"}, Vm)).status.revision == vm.status.revision


async def test_a_running_vm_keeps_its_vrf_until_stopped(node: Node) -> None:
    await import_image(node)
    vm = await node.client.call("vm.create", {"name": "r", "image": "base"}, Vm)
    assert (await wait_task(node, await node.client.call("vm.start", {"name": "r"}, TaskReply))).status == "succeeded"
    await expect_error(node, "vm.update", {"name": "r", "revision": vm.status.revision, "network": {"vrf": "red"}},
                       "409", "network")


async def test_a_second_import_of_a_name_is_a_409_at_once_even_in_another_format(node: Node) -> None:
    node.make_image_file("x.raw", fmt="raw")
    node.make_image_file("x.qcow2", fmt="qcow2")
    first, second = await asyncio.gather(
        node.client.call("image.import", {"name": "x", "path": "x.raw"}, TaskReply),
        node.client.call("image.import", {"name": "x", "path": "x.qcow2"}, TaskReply),
        return_exceptions=True,
    )
    assert isinstance(first, TaskReply), first
    assert isinstance(second, RemoteError) and (second.code, second.field) == ("409", "name"), second
    assert "being imported" in second.message
    task = await wait_task(node, first)
    assert task.status == "succeeded", task.error
    images = node.config.state_dir / "lifecycle" / "images"
    assert sorted(p.name for p in images.iterdir()) == ["x.raw"]  # the winner's file stays, alone
    assert (await node.client.call("image.get", {"name": "x"}, Image)).format == "raw"
    # the name is free again once the import ended: a delete, then an import in the other format
    await node.client.call("image.delete", {"name": "x"})
    task = await wait_task(node, await node.client.call("image.import", {"name": "x", "path": "x.qcow2"}, TaskReply))
    assert task.status == "succeeded", task.error
    assert sorted(p.name for p in images.iterdir()) == ["x.qcow2"]
