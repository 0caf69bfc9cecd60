"""The lifecycle service on real QEMU/TCG guests, driven over NATS only.

One lifecycle node on `qemu:///system` serves the whole module; the test guest's BIOS and UEFI images
(tests/guest) are imported through `image.import`, and every VM boots from them. What a guest did is
read from its serial console log (`<state>/lifecycle/vms/<vm>/console.log`, written by libvirt), where
the guest's init prints `EDGEVM-GUEST: ...` markers (see tests/guest/init.sh).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from edgevm.cli.natsserver import NatsServer
from edgevm.lifecycle.userdata import validate_user_data
from edgevm.shared import subjects
from edgevm.shared.bus import LOCKS, ensure_jetstream
from edgevm.shared.commands import TaskList, TaskReply, VmList
from edgevm.shared.ids import new_id
from edgevm.shared.locks import VmLocks
from edgevm.shared.objects import Task, Vm
from tests.guest.build import GuestImages
from tests.guest.console import MARKER_PREFIX
from tests.guest.fixtures import guest_images as guest_images  # the session fixture, for this module
from tests.helpers import EventCollector, eventually
from tests.lifecycle.conftest import Node, start_node
from tests.lifecycle.test_lifecycle_breadth import wait_task

pytestmark = pytest.mark.guest

URI = "qemu:///system"
BIOS_IMAGE = "guest-bios"
UEFI_IMAGE = "guest-uefi"
# TCG on two shared cores: a boot takes ~8-15 s, far more when other tests load the machine.
BOOT_TIMEOUT = 120.0
TASK_TIMEOUT = 90.0
VM_NAMES = ("bios-guest", "uefi-guest", "ide-guest", "deaf-guest", "self-off-guest", "leased-guest")


# -- helpers ----------------------------------------------------------------------------------------------
def console_log(node: Node, vm: str) -> Path:
    """The file libvirt logs the VM's serial console to."""
    return node.config.state_dir / "lifecycle" / "vms" / vm / "console.log"


def console_text(path: Path) -> str:
    """What the guest printed so far ("" before libvirt made the file), with plain "\\n" line ends."""
    try:
        return path.read_bytes().decode("utf-8", errors="replace").replace("\r", "")
    except FileNotFoundError:
        return ""


async def wait_marker(path: Path, marker: str, *, timeout: float = BOOT_TIMEOUT, since: int = 0) -> int:
    """Wait for the console line "EDGEVM-GUEST: <marker>" (a regex) at or after offset `since`.

    Returns the offset just past the line, to look for later markers from there.
    """
    regex = re.compile("^" + re.escape(MARKER_PREFIX) + marker + "$", re.MULTILINE)
    deadline = time.monotonic() + timeout
    while True:
        text = console_text(path)
        found = regex.search(text, since)
        if found:
            return found.end()
        if time.monotonic() > deadline:
            raise AssertionError(f"no {regex.pattern!r} in {path} within {timeout:g} s; it ends with:\n"
                                 f"{text[-3000:]}")
        await asyncio.sleep(0.2)


async def virsh(*args: str, check: bool = True) -> str:
    """Run virsh on qemu:///system (for checks and last-resort cleanup only; tests act through NATS)."""
    done = await asyncio.to_thread(subprocess.run, ["virsh", "-c", URI, *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


async def edgevm_domains() -> list[str]:
    """The names of the edgevm domains defined on qemu:///system (running or not)."""
    return [line for line in (await virsh("list", "--all", "--name")).split() if line.startswith("edgevm-")]


async def vm_state(node: Node, name: str) -> str:
    return (await node.client.call("vm.get", {"name": name}, Vm)).status.state


async def wait_state(node: Node, name: str, state: str, timeout: float = 60) -> None:
    async def reached() -> bool:
        return await vm_state(node, name) == state

    await eventually(reached, timeout=timeout, what=f"VM {name} {state}")


async def run_task(node: Node, verb: str, body: dict[str, Any], timeout: float = TASK_TIMEOUT) -> Task:
    """Submit a task command and wait for the task to end; returns it (whatever its status)."""
    return await wait_task(node, await node.client.call(verb, body, TaskReply), timeout=timeout)


@asynccontextmanager
async def guest_vm(node: Node, **spec: Any) -> AsyncIterator[str]:
    """Create a VM from `spec`; on the way out delete it (a vm.delete task) and check its domain is gone."""
    name = spec["name"]
    vm = await node.client.call("vm.create", spec, Vm)
    assert vm.status.state == "defined"
    try:
        yield name
    finally:
        try:
            deleted = await run_task(node, "vm.delete", {"name": name})
            assert deleted.status == "succeeded", deleted.error
        finally:
            left = f"edgevm-{name}"
            if left in await edgevm_domains():
                # Never leave a guest running behind a failed test, whatever the service did.
                await virsh("destroy", left, check=False)
                await virsh("undefine", "--nvram", left, check=False)
                raise AssertionError(f"vm.delete left the domain {left} on {URI}")


async def start_and_boot(node: Node, name: str) -> tuple[Path, int, float]:
    """vm.start, check `running`, wait for the guest's `ready`; return its console log, offset and boot time."""
    began = time.monotonic()
    started = await run_task(node, "vm.start", {"name": name})
    assert (started.kind, started.status) == ("vm.start", "succeeded"), started.error
    assert await vm_state(node, name) == "running"
    log = console_log(node, name)
    ready = await wait_marker(log, "ready")
    return log, ready, time.monotonic() - began


# -- the node -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
async def guest_node(nats_server: NatsServer, nc: NATS, guest_images: GuestImages) -> AsyncIterator[Node]:
    """A lifecycle node on qemu:///system with the test guest's images imported through image.import."""
    node = await start_node(nats_server, nc, uri=URI)
    try:
        node.import_dir.mkdir(parents=True, exist_ok=True)
        for name, source in ((BIOS_IMAGE, guest_images.bios), (UEFI_IMAGE, guest_images.uefi)):
            shutil.copyfile(source, node.import_dir / f"{name}.qcow2")
            task = await run_task(node, "image.import", {"name": name, "path": f"{name}.qcow2"})
            assert task.status == "succeeded", task.error
            assert task.result is not None and task.result["format"] == "qcow2"
        yield node
    finally:
        await node.shutdown()
        shutil.rmtree(node.config.state_dir, ignore_errors=True)


# -- the tests ----------------------------------------------------------------------------------------------
async def test_bios_virtio_guest_boots_and_stops_gracefully(guest_node: Node) -> None:
    node = guest_node
    stop_timeout = 60
    async with guest_vm(node, name="bios-guest", image=BIOS_IMAGE, firmware="bios", device_bus="virtio",
                        hostname="bios-guest-1", memory="256MB", stop_timeout=stop_timeout) as name:
        log, ready, boot = await start_and_boot(node, name)
        assert f"{MARKER_PREFIX}hostname=bios-guest-1\n" in console_text(log)
        print(f"bios/virtio boot to ready: {boot:.1f} s")

        began = time.monotonic()
        stopped = await run_task(node, "vm.stop", {"name": name}, timeout=stop_timeout + 30)
        took = time.monotonic() - began
        assert (stopped.kind, stopped.status) == ("vm.stop", "succeeded"), stopped.error
        assert stopped.result == {"forced": False}
        assert took < stop_timeout, f"a graceful stop took {took:.1f} s, stop_timeout is {stop_timeout} s"
        await wait_marker(log, "poweroff", timeout=10, since=ready)
        assert await vm_state(node, name) == "stopped"
        print(f"bios/virtio graceful stop: {took:.1f} s")


async def test_uefi_sata_guest_boots(guest_node: Node) -> None:
    node = guest_node
    data = {"name": "data", "kind": "disk", "size": "32MB"}
    async with guest_vm(node, name="uefi-guest", image=UEFI_IMAGE, firmware="uefi", device_bus="sata",
                        hostname="uefi-guest-1", memory="256MB", volumes=[data]) as name:
        log, _, boot = await start_and_boot(node, name)
        assert f"{MARKER_PREFIX}hostname=uefi-guest-1\n" in console_text(log)
        vm_dir = node.config.state_dir / "lifecycle" / "vms" / name
        assert (vm_dir / "nvram.fd").exists()
        print(f"uefi/sata boot to ready: {boot:.1f} s")
        # A running VM's disk grows live, through QEMU (libvirt blockResize), not behind its back.
        vm = await node.client.call("vm.get", {"name": name}, Vm)
        await node.client.call("vm.update", {"name": name, "revision": vm.status.revision,
                                             "volumes": [{**data, "size": "48MB"}]}, Vm)
        info = json.loads((await asyncio.to_thread(
            subprocess.run, ["qemu-img", "info", "-U", "--output=json", str(vm_dir / "volume-data.qcow2")],
            capture_output=True, check=True)).stdout)
        assert info["virtual-size"] == 48 << 20


async def test_ide_guest_boots(guest_node: Node) -> None:
    node = guest_node
    async with guest_vm(node, name="ide-guest", image=BIOS_IMAGE, firmware="bios", device_bus="ide",
                        memory="256MB") as name:
        log, _, boot = await start_and_boot(node, name)
        # No hostname in the spec: the seed's meta-data carries the VM name.
        assert f"{MARKER_PREFIX}hostname=ide-guest\n" in console_text(log)
        print(f"bios/ide boot to ready: {boot:.1f} s")


async def test_guest_ignoring_acpi_is_forced_off_after_stop_timeout(guest_node: Node) -> None:
    node = guest_node
    stop_timeout = 5
    user_data = "#cloud-config\n#edgevm-test: ignore-acpi\n"
    async with guest_vm(node, name="deaf-guest", image=BIOS_IMAGE, memory="256MB", stop_timeout=stop_timeout,
                        cloud_init={"user_data": user_data}) as name:
        log, ready, _ = await start_and_boot(node, name)
        assert f"{MARKER_PREFIX}acpi ignored\n" in console_text(log)

        began = time.monotonic()
        stopped = await run_task(node, "vm.stop", {"name": name}, timeout=stop_timeout + 40)
        took = time.monotonic() - began
        assert (stopped.kind, stopped.status) == ("vm.stop", "succeeded"), stopped.error
        assert stopped.result == {"forced": True}
        assert stop_timeout <= took < stop_timeout + 15, f"the forced stop took {took:.1f} s"
        assert await vm_state(node, name) == "stopped"
        # Destroyed, not shut down: the guest never ran its poweroff.
        assert f"{MARKER_PREFIX}poweroff\n" not in console_text(log)[ready:]
        print(f"forced stop after stop_timeout {stop_timeout} s: {took:.1f} s")


def test_user_data_validator_accepts_the_test_flags() -> None:
    """The guest reads `#edgevm-test:` lines of user-data, which a #cloud-config document holds as comments."""
    for user_data in ("#cloud-config\n#edgevm-test: ignore-acpi\n", "#cloud-config\n#edgevm-test: poweroff-after 3\n"):
        assert validate_user_data(user_data) == user_data


async def test_guest_powering_itself_off_is_stopped_without_a_command(guest_node: Node, nc: NATS) -> None:
    node = guest_node
    name = "self-off-guest"
    events = await EventCollector().start(nc, subjects.event(node.config.node, f"vm.{name}"))
    try:
        async with guest_vm(node, name=name, image=BIOS_IMAGE, memory="256MB",
                            cloud_init={"user_data": "#cloud-config\n#edgevm-test: poweroff-after 3\n"}):
            began = time.monotonic()
            started = await run_task(node, "vm.start", {"name": name})
            assert started.status == "succeeded", started.error
            log = console_log(node, name)
            ready = await wait_marker(log, "ready")
            await wait_marker(log, "poweroff", timeout=60, since=ready)
            await wait_state(node, name, "stopped", timeout=60)
            took = time.monotonic() - began

            async def stopped_event() -> list[Any]:
                return events.of_type("vm.stopped")

            stopped = (await eventually(stopped_event, timeout=10, what="a vm.stopped event"))[-1]
            assert stopped.vm.spec.name == name and stopped.vm.status.state == "stopped"
            kinds = [e.__struct_config__.tag for _, e in events.events]
            assert kinds.index("vm.started") < kinds.index("vm.stopped"), kinds
            # Nobody asked: the only task of the VM is its start.
            tasks = (await node.client.call("task.list", {"vm": name}, TaskList)).tasks
            assert [t.kind for t in tasks] == ["vm.start"]
            print(f"self power-off observed as stopped {took:.1f} s after vm.start")
    finally:
        await events.stop()


async def test_guest_powering_off_while_another_service_holds_its_lease_ends_stopped(
    guest_node: Node, nc: NATS
) -> None:
    node = guest_node
    locks = VmLocks((await ensure_jetstream(nc.jetstream()))[LOCKS.name], node.config.node, "snapshotter")
    async with guest_vm(node, name="leased-guest", image=BIOS_IMAGE, memory="256MB",
                        cloud_init={"user_data": "#cloud-config\n#edgevm-test: poweroff-after 3\n"}) as name:
        started = await run_task(node, "vm.start", {"name": name})
        assert started.status == "succeeded", started.error
        async with locks.hold(name, "snapshot.create", new_id()):
            await wait_marker(console_log(node, name), "poweroff")

            async def shut_off() -> bool:
                return (await virsh("domstate", f"edgevm-{name}")).strip() == "shut off"

            await eventually(shut_off, timeout=30, what="the domain shut off")
            await asyncio.sleep(2)  # libvirt's event arrives (and is set aside) while the lease is held
        # The lease is gone and the domain is off: the VM must not stay `running`.
        await wait_state(node, name, "stopped", timeout=15)


async def test_no_edgevm_domain_is_left(guest_node: Node) -> None:
    """Every test deleted its VMs: the node has none, and qemu:///system none of their domains."""
    assert (await guest_node.client.call("vm.list", {}, VmList)).vms == []
    ours = {f"edgevm-{vm}" for vm in VM_NAMES}
    assert ours.isdisjoint(await edgevm_domains())
