"""A real QEMU/TCG guest plugged in by netplumb: its address from cloud-init, reached through a port mapping.

Lifecycle and netplumb of one node run in this process, the node's world being the host's namespace (libvirt
creates the guest's tap there). The guest lives in a VRF of its own (a namespace `<prefix><vrf>`); a "LAN host"
namespace reaches it through a veth on the node and a host port mapping, with real TCP: the guest's HTTP
server and its TCP echo. Everything the test creates has a random name and is removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from nats.aio.client import Client as NATS

from edgevm.cli.natsserver import NatsServer
from edgevm.netplumb import names
from edgevm.netplumb.app import make_setup
from edgevm.netplumb.settings import Settings
from edgevm.shared.client import Client
from edgevm.shared.config import Config
from edgevm.shared.errors import RemoteError
from edgevm.shared.objects import Vm
from edgevm.shared.runtime import serve
from tests.guest.build import GuestImages
from tests.guest.console import MARKER_PREFIX
from tests.guest.fixtures import guest_images as guest_images  # the session fixture, for this module
from tests.helpers import eventually
from tests.lifecycle.conftest import Node, start_node, state_dir
from tests.lifecycle.test_guests import BIOS_IMAGE, URI, console_log, console_text, run_task, wait_marker

pytestmark = [pytest.mark.guest]

NODE_LAN, LAN_HOST = "192.168.231.1", "192.168.231.2"
DEFAULT_SUBNET = "10.231.0.0/24"  # the default VRF netplumb makes in the host namespace for this test
VRF_SUBNET = "10.232.0.0/24"
HTTP_PORT, ECHO_PORT = 18080, 17007


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, check=check)


@dataclass
class Lan:
    """A LAN host namespace wired to the node by a veth: `node_if` on the node, eth0 inside."""

    netns: str
    node_if: str

    def fetch(self, port: int, payload: bytes | None = None) -> bytes | None:
        """Connect from the LAN host to the node's LAN address; HTTP GET, or echo `payload`; None when refused."""
        script = (
            "import socket,sys\n"
            f"s=socket.create_connection(('{NODE_LAN}',{port}),timeout=5)\n"
            + (f"s.sendall({payload!r});s.shutdown(socket.SHUT_WR)\n" if payload is not None else
               "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n")
            + "d=b''\n"
            "while True:\n"
            " c=s.recv(4096)\n"
            " if not c: break\n"
            " d+=c\n"
            "sys.stdout.buffer.write(d)\n"
        )
        done = subprocess.run(["ip", "netns", "exec", self.netns, "python3", "-c", script], capture_output=True,
                              timeout=20)
        return done.stdout if done.returncode == 0 else None


@pytest.fixture
def lan() -> AsyncIterator[Lan]:
    tag = secrets.token_hex(3)
    lan = Lan(f"edgevm-t-lan-{tag}", f"evl{tag}")
    ip("netns", "add", lan.netns)
    try:
        ip("link", "add", lan.node_if, "type", "veth", "peer", "name", "eth0", "netns", lan.netns)
        ip("addr", "add", f"{NODE_LAN}/24", "dev", lan.node_if)
        ip("link", "set", lan.node_if, "up")
        ip("addr", "add", f"{LAN_HOST}/24", "dev", "eth0", netns=lan.netns)
        ip("link", "set", "eth0", "up", netns=lan.netns)
        ip("link", "set", "lo", "up", netns=lan.netns)
        yield lan
    finally:
        ip("link", "del", lan.node_if, check=False)
        ip("netns", "del", lan.netns, check=False)


@contextlib.asynccontextmanager
async def netplumb_in_host(nats_server: NatsServer, nc: NATS, node: str, prefix: str) -> AsyncIterator[Client]:
    """A netplumb service of `node` in this process, plumbing the host namespace; cleans the host up after."""
    settings = Settings(default_subnet=ipaddress.IPv4Network(DEFAULT_SUBNET), netns_prefix=prefix,
                        reconcile_interval=0)
    state = state_dir()
    config = Config(node=node, nats_url=nats_server.url, state_dir=state, libvirt_uri=URI,
                    metrics_host="127.0.0.1", metrics_base_port=0, metrics_port=0, log_level="INFO")
    stop = asyncio.Event()
    task = asyncio.create_task(serve("netplumb", make_setup(settings), config, stop))
    try:
        yield Client(nc, node, timeout=15)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await asyncio.to_thread(clean_host, prefix)
        shutil.rmtree(state, ignore_errors=True)


def clean_host(prefix: str) -> None:
    """Remove what netplumb made in the host namespace for the test node (it keeps kernel state on stop)."""
    ip("link", "del", names.host_bridge("default"), check=False)
    for family in ("inet", "ip"):
        subprocess.run(["nft", "delete", "table", family, "edgevm"], capture_output=True, check=False)
    for line in ip("netns", "list").stdout.splitlines():
        if line.startswith(prefix):
            ip("netns", "del", line.split()[0], check=False)


async def test_guest_gets_its_address_and_answers_through_a_port_mapping(
    nats_server: NatsServer, nc: NATS, guest_images: GuestImages, lan: Lan
) -> None:
    tag = secrets.token_hex(3)
    node_id, vrf, prefix = f"g{tag}", f"v{tag}", f"edgevm-t{tag}-"
    async with netplumb_in_host(nats_server, nc, node_id, prefix) as net:
        await eventually(lambda: _answers(net), timeout=30, what="netplumb answers")
        node: Node = await start_node(nats_server, nc, uri=URI, node=node_id, network="netplumb")
        try:
            await _import_bios(node, guest_images)
            await net.call("net.vrf.create", {"name": vrf, "subnet": VRF_SUBNET})
            mappings = [
                {"host_interface": lan.node_if, "host_port": HTTP_PORT, "vm_port": 80, "protocol": "tcp"},
                {"host_interface": lan.node_if, "host_port": ECHO_PORT, "vm_port": 7, "protocol": None},
            ]
            vm = await node.client.call("vm.create", {
                "name": "netguest", "image": BIOS_IMAGE, "memory": "256MB",
                "network": {"vrf": vrf, "port_mappings": mappings}}, Vm)
            try:
                address = vm.status.ip_addresses[0]
                assert ipaddress.IPv4Address(address) in ipaddress.IPv4Network(VRF_SUBNET)
                started = await run_task(node, "vm.start", {"name": "netguest"})
                assert started.status == "succeeded", started.error
                log = console_log(node, "netguest")
                await wait_marker(log, "ready")
                # The guest applied what netplumb put in its seed's network-config.
                assert f"{MARKER_PREFIX}ip={address}/24\n" in console_text(log)

                page = await eventually(lambda: _fetch(lan, HTTP_PORT), timeout=30, what="HTTP through the mapping")
                assert b"edgevm test guest netguest" in page
                assert await asyncio.to_thread(lan.fetch, ECHO_PORT, b"ping through netplumb") == (
                    b"ping through netplumb")
                status = await net.call("net.status", {"vm": "netguest"})
                assert status["ip_addresses"] == [address] and len(status["port_mappings"]) == 2

                stopped = await run_task(node, "vm.stop", {"name": "netguest", "force": True})
                assert stopped.status == "succeeded", stopped.error
                assert await asyncio.to_thread(lan.fetch, HTTP_PORT) is None, "the port closes with the VM"
            finally:
                deleted = await run_task(node, "vm.delete", {"name": "netguest"})
                assert deleted.status == "succeeded", deleted.error
            with pytest.raises(RemoteError) as gone:
                await net.call("net.status", {"vm": "netguest"})
            assert gone.value.code == "404", "vm.delete released the VM's network"
            await net.call("net.vrf.delete", {"name": vrf})
        finally:
            await node.shutdown()
            shutil.rmtree(node.config.state_dir, ignore_errors=True)


async def _answers(client: Client) -> bool:
    await client.call("net.vrf.list")
    return True


async def _fetch(lan: Lan, port: int) -> bytes | None:
    return await asyncio.to_thread(lan.fetch, port)


async def _import_bios(node: Node, images: GuestImages) -> None:
    node.import_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(images.bios, node.import_dir / f"{BIOS_IMAGE}.qcow2")
    task = await run_task(node, "image.import", {"name": BIOS_IMAGE, "path": f"{BIOS_IMAGE}.qcow2"})
    assert task.status == "succeeded", task.error
