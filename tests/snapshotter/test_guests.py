"""Snapshots of real QEMU/TCG test guests on qemu:///system, driven over NATS only.

One node serves the module: a lifecycle service in this process and the snapshotter as its own process
(`python -m edgevm.snapshotter`, as `edgevm node up` starts it), so a test can SIGKILL it mid-task. Two
guests are reused across the tests, booted side by side: a BIOS one (internal snapshots with memory) and a
UEFI one (external disk-only snapshots). What a guest sees is checked through its serial console. The
node's state directory is reached through a symbolic link (EDGEVM_STATE_DIR names the link), as on a host
whose /var/lib/edgevm links to another disk.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from edgevm.cli.natsserver import NatsServer
from edgevm.shared import subjects
from edgevm.shared.commands import SnapshotList, TaskReply
from edgevm.shared.errors import RemoteError
from edgevm.shared.events import TaskUpdated, decode_event
from edgevm.shared.objects import Task
from tests.guest.build import GuestImages
from tests.guest.fixtures import guest_images as guest_images  # the session fixture, for this module
from tests.helpers import ServiceProcess, eventually
from tests.lifecycle.conftest import Node, start_node, state_dir
from tests.lifecycle.test_guests import (
    BIOS_IMAGE,
    UEFI_IMAGE,
    URI,
    console_log,
    console_text,
    edgevm_domains,
    run_task,
    virsh,
    wait_marker,
)
from tests.lifecycle.test_lifecycle_breadth import wait_task
from tests.snapshotter.guestshell import guest_run

pytestmark = pytest.mark.guest

BIOS_VM, UEFI_VM = "snap-bios", "snap-uefi"
TASK_TIMEOUT = 180.0


class GuestNode:
    """The module's node: lifecycle in this process, the snapshotter as a process."""

    def __init__(self, node: Node, snapshotter: ServiceProcess) -> None:
        self.node = node
        self.snapshotter = snapshotter

    async def snapshot(self, verb: str, vm: str, name: str, **extra: Any) -> Task:
        reply = await self.node.client.call(verb, {"vm": vm, "name": name, **extra}, TaskReply)
        return await wait_task(self.node, reply, timeout=TASK_TIMEOUT)

    async def tree(self, vm: str) -> dict[str, tuple[str | None, bool]]:
        listed = await self.node.client.call("snapshot.list", {"vm": vm}, SnapshotList)
        return {s.name: (s.parent, s.current) for s in listed.snapshots}

    def vm_dir(self, vm: str) -> Path:
        return self.node.config.state_dir / "lifecycle" / "vms" / vm

    def layer_files(self, vm: str) -> list[str]:
        layers = self.vm_dir(vm) / "snapshots"
        return sorted(p.name for p in layers.iterdir()) if layers.exists() else []

    def start_snapshotter(self) -> None:
        self.snapshotter.start()


async def snapshotter_answers(node: Node) -> None:
    async def answers() -> bool:
        try:
            await node.client.call("snapshot.list", {"vm": "no-such-vm"})
        except RemoteError as error:
            return error.code == "404"
        return True

    await eventually(answers, timeout=60, what="the snapshotter answers")


async def domstate(vm: str) -> str:
    return (await virsh("domstate", f"edgevm-{vm}")).strip()


async def sh(vm: str, command: str) -> tuple[int, str]:
    return await guest_run(URI, vm, command)


@pytest.fixture(scope="module")
async def gnode(nats_server: NatsServer, nc: NATS, guest_images: GuestImages,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GuestNode]:
    real = state_dir()
    link = real.with_name(real.name + "-link")
    link.symlink_to(real)
    node = await start_node(nats_server, nc, uri=URI, state=link)
    env = {
        "EDGEVM_NODE": node.config.node, "EDGEVM_NATS_URL": nats_server.url,
        "EDGEVM_STATE_DIR": str(node.config.state_dir), "EDGEVM_LIBVIRT_URI": URI,
    }
    snapshotter = ServiceProcess("snapshotter", env, tmp_path_factory.mktemp("snapshotter") / "service.log")
    gnode = GuestNode(node, snapshotter)
    try:
        node.import_dir.mkdir(parents=True, exist_ok=True)
        for name, source in ((BIOS_IMAGE, guest_images.bios), (UEFI_IMAGE, guest_images.uefi)):
            shutil.copyfile(source, node.import_dir / f"{name}.qcow2")
            task = await run_task(node, "image.import", {"name": name, "path": f"{name}.qcow2"})
            assert task.status == "succeeded", task.error
        snapshotter.start()
        await snapshotter_answers(node)
        yield gnode
    finally:
        try:
            snapshotter.stop()
            print(snapshotter.log()[-4000:])
        finally:
            await node.shutdown()
            link.unlink()
            shutil.rmtree(real, ignore_errors=True)


@pytest.fixture(scope="module")
async def guests(gnode: GuestNode) -> AsyncIterator[GuestNode]:
    """Both guests created and booted side by side; deleted (with their snapshots) at the end."""
    node = gnode.node
    specs = [
        {"name": BIOS_VM, "image": BIOS_IMAGE, "firmware": "bios", "device_bus": "virtio", "memory": "256MB"},
        {"name": UEFI_VM, "image": UEFI_IMAGE, "firmware": "uefi", "device_bus": "sata", "memory": "256MB"},
    ]
    for spec in specs:
        await node.client.call("vm.create", spec)
    try:
        started = await asyncio.gather(*(run_task(node, "vm.start", {"name": s["name"]}) for s in specs))
        assert all(t.status == "succeeded" for t in started), [t.error for t in started]
        await asyncio.gather(*(wait_marker(console_log(node, s["name"]), "ready") for s in specs))
        yield gnode
    finally:
        deleted = await asyncio.gather(*(run_task(node, "vm.delete", {"name": s["name"]}) for s in specs))
        left = [d for d in await edgevm_domains() if d in (f"edgevm-{BIOS_VM}", f"edgevm-{UEFI_VM}")]
        for domain in left:
            await virsh("destroy", domain, check=False)
            await virsh("undefine", "--nvram", "--snapshots-metadata", domain, check=False)
        assert all(t.status == "succeeded" for t in deleted), [t.error for t in deleted]
        assert not left, f"vm.delete left {left}"
        assert not gnode.vm_dir(BIOS_VM).exists() and not gnode.vm_dir(UEFI_VM).exists()


async def boots_in(node: Node, vm: str) -> int:
    """How many times the guest booted so far (its init prints `boot` once per boot)."""
    return console_text(console_log(node, vm)).count("EDGEVM-GUEST: boot\n")


# -- bios: internal snapshots with memory ---------------------------------------------------------------------
async def test_bios_snapshot_with_memory_restores_the_disk_and_the_running_guest(guests: GuestNode) -> None:
    g = guests
    assert (await sh(BIOS_VM, "echo before > /data/before && sync"))[0] == 0
    task = await g.snapshot("snapshot.create", BIOS_VM, "s1", description="with memory")
    assert task.status == "succeeded", task.error
    assert task.result is not None
    assert (task.result["mode"], task.result["vm_state"], task.result["current"]) == ("internal", "running", True)

    assert (await sh(BIOS_VM, "echo after > /data/after && sync"))[0] == 0
    boots = await boots_in(g.node, BIOS_VM)
    restored = await g.snapshot("snapshot.restore", BIOS_VM, "s1")
    assert restored.status == "succeeded", restored.error
    assert await domstate(BIOS_VM) == "running"
    # The memory came back: the same boot of the guest goes on, and its shell answers at once.
    rc, listing = await sh(BIOS_VM, "ls /data")
    assert rc == 0 and "before" in listing.split() and "after" not in listing.split(), listing
    assert await boots_in(g.node, BIOS_VM) == boots
    # The lifecycle's definition was kept in a file only while the restore ran.
    assert not [f for f in g.layer_files(BIOS_VM) if f.startswith(".restore-")], g.layer_files(BIOS_VM)

    async def lifecycle_says_running() -> bool:
        return (await g.node.client.call("vm.get", {"name": BIOS_VM}))["status"]["state"] == "running"

    await eventually(lifecycle_says_running, timeout=30, what="the lifecycle shows the VM running")


async def test_bios_tree_with_a_delete_in_the_middle_stays_restorable(guests: GuestNode) -> None:
    g = guests
    assert (await sh(BIOS_VM, "echo two > /data/two && sync"))[0] == 0
    assert (await g.snapshot("snapshot.create", BIOS_VM, "s2")).status == "succeeded"
    assert (await sh(BIOS_VM, "echo three > /data/three && sync"))[0] == 0
    assert (await g.snapshot("snapshot.create", BIOS_VM, "s3")).status == "succeeded"
    assert await g.tree(BIOS_VM) == {"s1": (None, False), "s2": ("s1", False), "s3": ("s2", True)}

    deleted = await g.snapshot("snapshot.delete", BIOS_VM, "s2")
    assert deleted.status == "succeeded", deleted.error
    assert await g.tree(BIOS_VM) == {"s1": (None, False), "s3": ("s1", True)}
    assert (await g.snapshot("snapshot.restore", BIOS_VM, "s1")).status == "succeeded"
    rc, listing = await sh(BIOS_VM, "ls /data")
    assert rc == 0 and "two" not in listing.split() and "three" not in listing.split(), listing
    assert (await g.snapshot("snapshot.restore", BIOS_VM, "s3")).status == "succeeded"
    rc, listing = await sh(BIOS_VM, "ls /data")
    assert rc == 0 and {"before", "two", "three"} <= set(listing.split()), listing
    assert await g.tree(BIOS_VM) == {"s1": (None, False), "s3": ("s1", True)}


# -- uefi: external disk-only snapshots ----------------------------------------------------------------------
async def restore_and_wait_boot(g: GuestNode, vm: str, name: str) -> None:
    since = len(console_text(console_log(g.node, vm)))
    task = await g.snapshot("snapshot.restore", vm, name)
    assert task.status == "succeeded", task.error
    assert task.result is not None and task.result["current"] is True
    assert await domstate(vm) == "running"
    await wait_marker(console_log(g.node, vm), "ready", since=since)


async def test_uefi_external_snapshot_then_restore_drops_what_was_written(guests: GuestNode) -> None:
    g = guests
    assert (await sh(UEFI_VM, "echo one > /data/one && sync"))[0] == 0
    task = await g.snapshot("snapshot.create", UEFI_VM, "e1")
    assert task.status == "succeeded", task.error
    assert task.result is not None
    assert (task.result["mode"], task.result["vm_state"]) == ("external", "running")
    assert (await sh(UEFI_VM, "echo two > /data/two && sync"))[0] == 0

    await restore_and_wait_boot(g, UEFI_VM, "e1")
    rc, listing = await sh(UEFI_VM, "ls /data")
    assert rc == 0 and "one" in listing.split() and "two" not in listing.split(), listing
    # root.qcow2, where the lifecycle defines the disk, leads to the one active image.
    files = g.layer_files(UEFI_VM)
    active = [f for f in files if f.startswith("active-")]
    assert files == sorted(["snap-e1.qcow2", *active]) and len(active) == 1, files
    root = g.vm_dir(UEFI_VM) / "root.qcow2"
    assert root.is_symlink()
    assert os.path.realpath(root) == os.path.realpath(g.vm_dir(UEFI_VM) / "snapshots" / active[0])


async def test_uefi_tree_of_three_with_deletes_keeps_the_rest_restorable_and_leaves_no_files(
    guests: GuestNode,
) -> None:
    g = guests
    # The lifecycle redefines the domain with <vm_dir>/root.qcow2 on vm.update: snapshots go on from there.
    vm = await g.node.client.call("vm.get", {"name": UEFI_VM})
    await g.node.client.call("vm.update", {"name": UEFI_VM, "revision": vm["status"]["revision"],
                                           "description": "redefined between snapshots"})
    assert f"<source file='{g.vm_dir(UEFI_VM) / 'root.qcow2'}'" in await virsh("dumpxml", "--inactive",
                                                                               f"edgevm-{UEFI_VM}")
    assert (await sh(UEFI_VM, "echo f2 > /data/f2 && sync"))[0] == 0
    assert (await g.snapshot("snapshot.create", UEFI_VM, "e2")).status == "succeeded"
    assert (await sh(UEFI_VM, "echo f3 > /data/f3 && sync"))[0] == 0
    assert (await g.snapshot("snapshot.create", UEFI_VM, "e3")).status == "succeeded"
    assert await g.tree(UEFI_VM) == {"e1": (None, False), "e2": ("e1", False), "e3": ("e2", True)}

    # The middle one, while the guest runs on a disk above it: merged online.
    deleted = await g.snapshot("snapshot.delete", UEFI_VM, "e2")
    assert deleted.status == "succeeded", deleted.error
    assert await g.tree(UEFI_VM) == {"e1": (None, False), "e3": ("e1", True)}
    assert [f for f in g.layer_files(UEFI_VM) if not f.startswith("active-")] == ["snap-e1.qcow2", "snap-e3.qcow2"]
    assert (await sh(UEFI_VM, "test -e /data/f2 && test -e /data/f3"))[0] == 0

    await restore_and_wait_boot(g, UEFI_VM, "e1")
    rc, listing = await sh(UEFI_VM, "ls /data")
    assert rc == 0 and "one" in listing.split() and not {"f2", "f3"} & set(listing.split()), listing
    await restore_and_wait_boot(g, UEFI_VM, "e3")
    rc, listing = await sh(UEFI_VM, "ls /data")
    assert rc == 0 and {"one", "f2", "f3"} <= set(listing.split()), listing

    # The one the guest runs on, then the last: merged into the running disk, no file left behind.
    assert (await g.snapshot("snapshot.delete", UEFI_VM, "e3")).status == "succeeded"
    assert await g.tree(UEFI_VM) == {"e1": (None, True)}
    assert (await g.snapshot("snapshot.delete", UEFI_VM, "e1")).status == "succeeded"
    assert await g.tree(UEFI_VM) == {}
    files = g.layer_files(UEFI_VM)
    assert len(files) == 1 and files[0].startswith("active-"), files
    assert await domstate(UEFI_VM) == "running"
    rc, listing = await sh(UEFI_VM, "ls /data")
    assert rc == 0 and {"one", "f2", "f3"} <= set(listing.split()), listing
    assert (await sh(UEFI_VM, "echo still-writable > /data/last && sync"))[0] == 0


async def test_uefi_snapshots_are_external_by_construction(guests: GuestNode) -> None:
    g = guests
    with pytest.raises(RemoteError) as info:
        await g.node.client.call("snapshot.create", {"vm": UEFI_VM, "name": "x", "mode": "internal"})
    assert (info.value.code, info.value.field) == ("400", "mode")
    task = await g.snapshot("snapshot.create", UEFI_VM, "only")
    assert task.status == "succeeded" and task.result is not None and task.result["mode"] == "external"
    with pytest.raises(RemoteError) as info:
        await g.node.client.call("snapshot.restore", {"vm": UEFI_VM, "name": "unknown"})
    assert (info.value.code, info.value.field) == ("404", "name")


async def test_uefi_snapshots_of_a_stopped_vm_are_taken_restored_and_deleted_offline(guests: GuestNode) -> None:
    g = guests
    assert (await sh(UEFI_VM, "echo cold > /data/cold && sync"))[0] == 0
    stopped = await run_task(g.node, "vm.stop", {"name": UEFI_VM, "force": True})
    assert stopped.status == "succeeded", stopped.error
    task = await g.snapshot("snapshot.create", UEFI_VM, "cold")
    assert task.status == "succeeded", task.error
    assert task.result is not None and (task.result["mode"], task.result["vm_state"]) == ("external", "stopped")
    restored = await g.snapshot("snapshot.restore", UEFI_VM, "cold")
    assert restored.status == "succeeded", restored.error
    assert await domstate(UEFI_VM) == "shut off"  # it was stopped: it stays stopped
    deleted = await g.snapshot("snapshot.delete", UEFI_VM, "cold")
    assert deleted.status == "succeeded", deleted.error
    remaining = await g.tree(UEFI_VM)
    assert "cold" not in remaining
    assert "snap-cold.qcow2" not in g.layer_files(UEFI_VM)
    # The data of the deleted snapshot was merged into the disk: the guest boots and finds it.
    since = len(console_text(console_log(g.node, UEFI_VM)))
    started = await run_task(g.node, "vm.start", {"name": UEFI_VM})
    assert started.status == "succeeded", started.error
    await wait_marker(console_log(g.node, UEFI_VM), "ready", since=since)
    assert (await sh(UEFI_VM, "test -e /data/cold"))[0] == 0


# -- a worker killed mid-task ---------------------------------------------------------------------------------
async def submit_and_freeze(g: GuestNode, nc: NATS, verb: str, vm: str, name: str, step: str) -> Task:
    """Submit a snapshot command and stop (SIGSTOP) the snapshotter the moment its task begins `step`: the
    process can write nothing more, so the task is cut mid-task for certain. Returns the task as it stays."""
    task_id: list[str] = []
    reached = asyncio.Event()

    async def on_event(msg: Any) -> None:
        event = decode_event(msg.data)
        if (isinstance(event, TaskUpdated) and event.task.id in task_id and event.task.message.startswith(step)
                and not reached.is_set()):
            assert g.snapshotter.process is not None
            g.snapshotter.process.send_signal(signal.SIGSTOP)
            reached.set()

    sub = await nc.subscribe(subjects.event(g.node.config.node, "task.*"), cb=on_event)
    try:
        task_id.append((await g.node.client.call(verb, {"vm": vm, "name": name}, TaskReply)).task.id)
        await asyncio.wait_for(reached.wait(), 60)
    finally:
        await sub.unsubscribe()
    task = await g.node.client.call("task.get", {"id": task_id[0]}, Task)
    assert task.status == "running", task
    return task


async def task_messages(nc: NATS, node: Node, task_id: str) -> list[str]:
    """Every message the task showed, from its replayed events."""
    js = nc.jetstream()
    sub = await js.subscribe(subjects.event(node.config.node, f"task.{task_id}"), ordered_consumer=True)
    messages: list[str] = []
    try:
        while not messages or messages[-1] not in ("done", "failed"):
            event = decode_event((await sub.next_msg(timeout=5)).data)
            assert isinstance(event, TaskUpdated)
            messages.append(event.task.message)
    finally:
        await sub.unsubscribe()
    return messages


async def kill_and_resume(g: GuestNode, nc: NATS, cut: Task) -> Task:
    """SIGKILL the (stopped) snapshotter, start it again; the cut task ends as the same run, resumed."""
    assert g.snapshotter.stop(signal.SIGKILL) == -signal.SIGKILL
    g.start_snapshotter()
    task = await wait_task(g.node, TaskReply(cut), timeout=TASK_TIMEOUT)
    print(f"{task.kind} of {task.vm} cut at {cut.message!r}: ended {task.status} "
          f"from {task.started_at} to {task.finished_at}")
    assert task.status == "succeeded", task.error
    assert task.started_at == cut.started_at
    messages = await task_messages(nc, g.node, task.id)
    assert messages.count("resumed after a restart of the snapshotter") == 1, messages
    return task


async def test_a_snapshotter_killed_at_the_memory_save_resumes_the_internal_create(
    guests: GuestNode, nc: NATS,
) -> None:
    g = guests
    cut = await submit_and_freeze(g, nc, "snapshot.create", BIOS_VM, "killed", "saving disks and memory")
    await kill_and_resume(g, nc, cut)
    assert (await g.tree(BIOS_VM))["killed"][1]
    # The VM is free again: the lifecycle can stop it.
    stopped = await run_task(g.node, "vm.stop", {"name": BIOS_VM, "force": True})
    assert stopped.status == "succeeded", stopped.error


async def test_a_snapshotter_killed_at_the_disk_switch_resumes_the_external_create(
    guests: GuestNode, nc: NATS,
) -> None:
    g = guests
    cut = await submit_and_freeze(g, nc, "snapshot.create", UEFI_VM, "killed-ext", "switching")
    # A running task holds its VM just as a queued one does.
    with pytest.raises(RemoteError) as busy:
        await g.node.client.call("vm.stop", {"name": UEFI_VM})
    assert busy.value.code == "409" and cut.id in busy.value.message
    await kill_and_resume(g, nc, cut)
    assert (await g.tree(UEFI_VM))["killed-ext"][1]
    # The cut create's files: its frozen image, and its own overlay as the one active image; nothing else.
    files = g.layer_files(UEFI_VM)
    assert "snap-killed-ext.qcow2" in files, files
    assert [f for f in files if f.startswith("active-")] == [f"active-{cut.id.lower()}.qcow2"], files
    assert not [f for f in files if f.startswith(".")], files
    assert (await sh(UEFI_VM, "echo after-kill > /data/after-kill && sync"))[0] == 0
