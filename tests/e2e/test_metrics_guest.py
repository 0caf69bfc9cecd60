"""The real Prometheus scrapes `edgevm node up` running a real QEMU/TCG guest: the guest's counters move with
what it does, and every query of every dashboard runs and, bar the listed error counters, returns data.

The node runs in the host's namespace (libvirt makes the guest's tap there) on qemu:///system, with a random
namespace prefix and its own default subnet; the guest sits in a VRF of its own and is reached from a "LAN
host" namespace through a port mapping (as in test_guest_network.py). Needs the heavy lock.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from edgevm.shared.client import Client
from edgevm.shared.commands import TaskReply
from edgevm.shared.errors import RemoteError
from edgevm.shared.objects import Task, Vm
from tests.e2e.conftest import NodeUp, start_node_up
from tests.e2e.test_guest_network import ECHO_PORT, NODE_LAN, Lan, clean_host
from tests.e2e.test_guest_network import lan as lan  # the fixture, for this module
from tests.e2e.test_prometheus import (
    NODE_LABEL,
    Prometheus,
    _all_up,
    every_dashboard_query,
    grafana_expanded,
    scrape_config_for,
    tail,
)
from tests.guest.build import GuestImages
from tests.guest.fixtures import guest_images as guest_images  # the session fixture, for this module
from tests.helpers import eventually
from tests.lifecycle.conftest import state_dir
from tests.lifecycle.test_guests import BIOS_IMAGE, BOOT_TIMEOUT, URI, wait_marker
from tests.snapshotter.guestshell import GuestShell

pytestmark = [pytest.mark.guest, pytest.mark.root]

VRF_SUBNET = "10.234.0.0/24"
DEFAULT_SUBNET = "10.233.0.0/24"
PAYLOAD = 1_000_000
# Queries that return nothing on a healthy node: they count errors that did not happen (their series appear
# with the first error), or need what the test guest lacks. Each is (dashboard, panel, refId): why.
QUIET = {
    ("edgevm-dashboard.json", "Events unacked (time range)", "A"): "no event went unacknowledged",
    ("edgevm-dashboard.json", "Events not acknowledged by JetStream", "A"): "no event went unacknowledged",
    ("edgevm-fleet.json", "Events not acknowledged by node", "A"): "no event went unacknowledged",
    ("edgevm-dashboard.json", "Conntrack overruns and resyncs", "A"): "no conntrack overrun",
    ("edgevm-dashboard.json", "Flow messages dropped / not acknowledged", "A"): "no flow message dropped",
    ("edgevm-vms.json", "Memory", "D"): "the test guest has no balloon driver reporting its memory use",
}


@pytest.fixture
def host_node(tmp_path: Path) -> Iterator[tuple[NodeUp, Path, str]]:
    """`edgevm node up` on qemu:///system in the host's namespace: (node, state dir, namespace prefix)."""
    prefix = f"edgevm-t{secrets.token_hex(3)}-"
    state = state_dir()
    node = start_node_up(state, tmp_path / "node.log", None, {
        "EDGEVM_LIBVIRT_URI": URI, "EDGEVM_NETNS_PREFIX": prefix, "EDGEVM_DEFAULT_SUBNET": DEFAULT_SUBNET})
    try:
        yield node, state, prefix
    finally:
        node.stop(60)
        clean_host(prefix)
        shutil.rmtree(state, ignore_errors=True)


async def test_a_running_guest_as_prometheus_sees_it(
    host_node: tuple[NodeUp, Path, str], guest_images: GuestImages, lan: Lan, tmp_path: Path
) -> None:
    node, state, _ = host_node
    vm = f"met-{secrets.token_hex(3)}"
    nc = await nats.connect(node.url)
    prometheus = Prometheus(scrape_config_for(node.metrics_base), tmp_path / "prometheus")
    holder: subprocess.Popen[bytes] | None = None
    try:
        client = Client(nc, "e2e", timeout=15)
        await eventually(lambda: client.call("net.vrf.list"), timeout=60, what="netplumb answers")
        await eventually(lambda: client.call("vm.list"), timeout=60, what="lifecycle answers")
        with pytest.raises(RemoteError):  # an error reply, for the error panels
            await client.call("vm.get", {"name": "no-such-vm"})
        await _import(client, state, guest_images)
        failed = await _task(client, "image.import", {"name": "broken", "path": "broken.qcow2", "format": "qcow2"})
        assert failed.status == "failed", "a task that fails, for the failure panels"
        vrf = f"v{secrets.token_hex(3)}"
        await client.call("net.vrf.create", {"name": vrf, "subnet": VRF_SUBNET})
        mapping = {"host_interface": lan.node_if, "host_port": ECHO_PORT, "vm_port": 7, "protocol": "tcp"}
        await client.call("vm.create", {"name": vm, "image": BIOS_IMAGE, "memory": "256MB",
                                        "network": {"vrf": vrf, "port_mappings": [mapping]}}, Vm)
        started = await _task(client, "vm.start", {"name": vm})
        assert started.status == "succeeded", started.error
        await wait_marker(state / "lifecycle" / "vms" / vm / "console.log", "ready", timeout=BOOT_TIMEOUT)
        await eventually(lambda: asyncio.to_thread(_all_up, prometheus), timeout=30, what="all five scraped")

        # CPU seconds grow while the guest runs.
        cpu = f'edgevm_vm_cpu_seconds_total{{vm="{vm}", node="e2e"}}'
        first = await _value(prometheus, cpu)
        await eventually(lambda: _grown(prometheus, cpu, first, 0.05), timeout=30, what="CPU seconds grow")

        # Network counters grow by what the test sends through the port mapping (and the echo back).
        received = f'sum(edgevm_vm_network_receive_bytes_total{{vm="{vm}"}})'
        sent = f'sum(edgevm_vm_network_transmit_bytes_total{{vm="{vm}"}})'
        rx, tx = await _value(prometheus, received), await _value(prometheus, sent)
        echoed = await eventually(lambda: asyncio.to_thread(_echo, lan, PAYLOAD), timeout=60,
                                  what="the echo through the port mapping")
        assert echoed == PAYLOAD
        await eventually(lambda: _grown(prometheus, received, rx, PAYLOAD), timeout=30, what="receive bytes grow")
        await eventually(lambda: _grown(prometheus, sent, tx, PAYLOAD), timeout=30, what="transmit bytes grow")

        # Disk counters grow when the guest reads its disk (past its page cache).
        read = f'edgevm_vm_disk_read_bytes_total{{vm="{vm}", disk="vda"}}'
        ops = f'edgevm_vm_disk_read_ops_total{{vm="{vm}", disk="vda"}}'
        before, ops_before = await _value(prometheus, read), await _value(prometheus, ops)
        shell = await GuestShell.open(URI, vm)
        try:
            rc, out = await shell.run("echo 3 >/proc/sys/vm/drop_caches; dd if=/dev/vda of=/dev/null bs=1M count=16")
        finally:
            shell.close()
        assert rc == 0, out
        await eventually(lambda: _grown(prometheus, read, before, 16 * 1024**2), timeout=30, what="read bytes grow")
        assert await _value(prometheus, ops) > ops_before

        # A connection held open through the mapping: the VM's active flows.
        holder = _hold_connection(lan)
        await eventually(lambda: _grown(prometheus, f'sum(edgevm_flowwatch_active_flows{{vm="{vm}"}})', 0, 1),
                         timeout=30, what="flowwatch counts the held connection")
        await _every_query_returns_data(prometheus, vm)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- prometheus log:\n{tail(prometheus.log_path)}\n"
                             f"--- node log:\n{tail(node.log, 60)}") from exc
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        await asyncio.to_thread(prometheus.stop)
        try:
            await _task(Client(nc, "e2e", timeout=30), "vm.delete", {"name": vm})
        finally:
            await nc.close()


async def _every_query_returns_data(prometheus: Prometheus, vm: str) -> None:
    empty = []
    for where, expr in every_dashboard_query():
        query = grafana_expanded(expr, node=NODE_LABEL, vm=vm, gateway=NODE_LABEL)
        if not await asyncio.to_thread(prometheus.query, query):
            empty.append(where)
    quiet = {f"{board}: panel {panel!r} target {ref}" for board, panel, ref in QUIET}
    assert set(empty) <= quiet, f"queries without data: {sorted(set(empty) - quiet)}"


async def _import(client: Client, state: Path, images: GuestImages) -> None:
    imports = state / "import"
    imports.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(images.bios, imports / f"{BIOS_IMAGE}.qcow2")
    (imports / "broken.qcow2").write_bytes(b"not a disk image")
    task = await _task(client, "image.import", {"name": BIOS_IMAGE, "path": f"{BIOS_IMAGE}.qcow2"})
    assert task.status == "succeeded", task.error


async def _task(client: Client, verb: str, body: dict[str, object]) -> Task:
    reply = await client.call(verb, body, TaskReply)

    async def ended() -> Task | None:
        task = await client.call("task.get", {"id": reply.task.id}, Task)
        return task if task.finished else None

    return await eventually(ended, timeout=120, what=f"{verb} ends")


async def _value(prometheus: Prometheus, expr: str) -> float:
    [series] = await eventually(lambda: asyncio.to_thread(prometheus.query, expr), timeout=30,
                                what=f"Prometheus has {expr}")
    return float(series["value"][1])


async def _grown(prometheus: Prometheus, expr: str, before: float, by: float) -> bool:
    result = await asyncio.to_thread(prometheus.query, expr)
    return bool(result) and float(result[0]["value"][1]) >= before + by


def _echo(lan: Lan, size: int) -> int:
    """Send `size` bytes from the LAN host to the guest's echo port; return how many came back (0: refused)."""
    script = (f"import socket,sys\ns=socket.create_connection(('{NODE_LAN}',{ECHO_PORT}),timeout=10)\n"
              f"s.sendall(b'x'*{size});s.shutdown(socket.SHUT_WR)\nn=0\n"
              "while True:\n c=s.recv(65536)\n if not c: break\n n+=len(c)\nprint(n)\n")
    done = subprocess.run(["ip", "netns", "exec", lan.netns, "python3", "-c", script], capture_output=True,
                          text=True, timeout=60)
    return int(done.stdout) if done.returncode == 0 else 0


def _hold_connection(lan: Lan) -> subprocess.Popen[bytes]:
    """A TCP connection from the LAN host to the guest's echo port, open until killed."""
    script = (f"import socket,time\ns=socket.create_connection(('{NODE_LAN}',{ECHO_PORT}),timeout=10)\n"
              "s.sendall(b'hold');s.recv(4)\ntime.sleep(300)\n")
    return subprocess.Popen(["ip", "netns", "exec", lan.netns, "python3", "-c", script])
