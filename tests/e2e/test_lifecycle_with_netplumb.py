"""Lifecycle and netplumb of one node together (libvirt's test driver, the node's world a namespace of its own).

What the user sees when netplumb refuses, is down, or comes up after lifecycle: a refused network creates
nothing anywhere, a port taken by another VM is a 409 naming the field, a delete while netplumb is down
fails with the VM whole and works once it is back, and a node that restarts before netplumb recovers its
lost domains and auto_start VMs as soon as netplumb answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network

import msgspec
import pytest
from nats.aio.client import Client as NATS

from edgevm.cli.natsserver import NatsServer
from edgevm.netplumb.app import make_setup
from edgevm.netplumb.settings import Settings
from edgevm.shared.bus import VMS
from edgevm.shared.client import Client
from edgevm.shared.clock import now
from edgevm.shared.config import Config
from edgevm.shared.errors import RemoteError
from edgevm.shared.objects import Vm, VmStatus
from edgevm.shared.runtime import serve
from edgevm.shared.spec import VmSpec
from tests.helpers import EventCollector, eventually
from tests.lifecycle.conftest import Node, start_node, state_dir
from tests.lifecycle.test_lifecycle_breadth import import_image, wait_task

pytestmark = pytest.mark.root


@dataclass
class World:
    """The node's network namespace and the prefix of its VRF namespaces."""

    netns: str
    prefix: str


@pytest.fixture
def world() -> Iterator[World]:
    tag = secrets.token_hex(3)
    made = World(f"edgevm-t-lnp-{tag}", f"edgevm-t-lnp{tag}-")
    subprocess.run(["ip", "netns", "add", made.netns], check=True)
    subprocess.run(["ip", "-n", made.netns, "link", "set", "lo", "up"], check=True)
    # A "LAN" interface the port mappings can name: one end of a veth pair inside the node's world.
    subprocess.run(["ip", "-n", made.netns, "link", "add", "lan0", "type", "veth", "peer", "name", "lan1"], check=True)
    try:
        yield made
    finally:
        for name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
            if name == made.netns or name.startswith(made.prefix):
                subprocess.run(["ip", "netns", "del", name], check=False)


@contextlib.asynccontextmanager
async def netplumb(nats_server: NatsServer, nc: NATS, node: str, world: World) -> AsyncIterator[Client]:
    settings = Settings(default_subnet=IPv4Network("10.78.0.0/24"), netns_prefix=world.prefix,
                        node_netns=world.netns, reconcile_interval=0)
    state = state_dir()
    config = Config(node, nats_server.url, state, "test:///default", "127.0.0.1", 0, 0, "WARNING")
    stop = asyncio.Event()
    task = asyncio.create_task(serve("netplumb", make_setup(settings), config, stop))
    client = Client(nc, node, timeout=10)
    try:
        await eventually(lambda: _answers(client, task), timeout=30, what="netplumb answers")
        yield client
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        shutil.rmtree(state, ignore_errors=True)


async def _answers(client: Client, task: asyncio.Task[None]) -> bool:
    if task.done():
        task.result()
    await client.call("net.vrf.list")
    return True


async def error_of(client: Client, verb: str, body: dict) -> RemoteError:
    with pytest.raises(RemoteError) as caught:
        await client.call(verb, body)
    return caught.value


async def test_refusals_outages_and_a_late_netplumb(nats_server: NatsServer, nc: NATS, world: World) -> None:
    node_id = f"l{secrets.token_hex(4)}"
    node: Node = await start_node(nats_server, nc, node=node_id, network="netplumb")
    vms_dir = node.config.state_dir / "lifecycle" / "vms"
    try:
        await import_image(node)
        async with netplumb(nats_server, nc, node_id, world) as net:
            # A refused network: the error is netplumb's, with its field; nothing is made anywhere.
            refused = await error_of(node.client, "vm.create", {"name": "a", "image": "base",
                                                                "network": {"vrf": "nowhere"}})
            assert (refused.code, refused.field) == ("404", "network.vrf")
            assert not (vms_dir / "a").exists()
            assert (await error_of(net, "net.status", {"vm": "a"})).code == "404"

            mapping = {"host_interface": "lan0", "host_port": 8080, "vm_port": 80, "protocol": "tcp"}
            web = await node.client.call("vm.create", {"name": "web", "image": "base", "auto_start": True,
                                                       "network": {"port_mappings": [mapping]}}, Vm)
            assert web.status.ip_addresses and web.status.ip_addresses[0].startswith("10.78.0.")
            taken = await error_of(node.client, "vm.create", {"name": "b", "image": "base",
                                                              "network": {"port_mappings": [mapping]}})
            assert (taken.code, taken.field) == ("409", "network.port_mappings[0].host_port")
            assert not (vms_dir / "b").exists()
            await eventually(lambda: _state(node, "web", "running"), what="web runs (auto_start)")
            status = await net.call("net.status", {"vm": "web"})
            assert [m["host_port"] for m in status["port_mappings"]] == [8080], "activated after the start"

        # The node restarts (a fresh test driver: every domain lost) while netplumb is down.
        await node.shutdown()
        node = await start_node(nats_server, nc, state=node.config.state_dir, node=node_id, network="netplumb")
        vm = await node.client.call("vm.get", {"name": "web"}, Vm)
        assert vm.status.state == "stopped", "lost domain, not an error: it waits for netplumb"
        async with netplumb(nats_server, nc, node_id, world) as net:
            await eventually(lambda: _state(node, "web", "running"), timeout=30,
                             what="web defined again and started once netplumb answers")

        # netplumb is down again: a delete fails before anything is removed, and says why.
        task = await wait_task(node, await node.client.call("vm.delete", {"name": "web"}))
        assert task.status == "failed", "the delete cannot release the VM's network"
        assert "net.vm.release" in (task.error or ""), task.error
        assert (await node.client.call("vm.get", {"name": "web"}, Vm)).spec.name == "web"
        assert (vms_dir / "web" / "root.qcow2").exists()
        async with netplumb(nats_server, nc, node_id, world) as net:
            done = await wait_task(node, await node.client.call("vm.delete", {"name": "web"}))
            assert done.status == "succeeded", done.error
            assert (await error_of(net, "net.status", {"vm": "web"})).code == "404"
            assert not (vms_dir / "web").exists()
    finally:
        await node.shutdown()
        shutil.rmtree(node.config.state_dir, ignore_errors=True)


async def _state(node: Node, name: str, state: str) -> bool:
    return (await node.client.call("vm.get", {"name": name}, Vm)).status.state == state



async def test_a_start_and_a_stop_each_announce_their_network_once(
        nats_server: NatsServer, nc: NATS, world: World) -> None:
    """Lifecycle's call and netplumb's watch of edgevm_vms both see a start and a stop: one `net.applied` each."""
    node_id = f"l{secrets.token_hex(4)}"
    node: Node = await start_node(nats_server, nc, node=node_id, network="netplumb")
    events = await EventCollector().start(nc, f"edgevm.evt.{node_id}.net.>")
    try:
        await import_image(node)
        async with netplumb(nats_server, nc, node_id, world) as net:
            mapping = {"host_interface": "lan0", "host_port": 8080, "vm_port": 80, "protocol": "tcp"}
            await node.client.call("vm.create", {"name": "web", "image": "base",
                                                 "network": {"port_mappings": [mapping]}})
            assert (await wait_task(node, await node.client.call("vm.start", {"name": "web"}))).status == "succeeded"
            assert (await wait_task(node, await node.client.call("vm.stop", {"name": "web"}))).status == "succeeded"

            # The watch takes edgevm_vms entries in order: once it has activated `marker` (written after
            # web's last state), it has seen web's start and stop too, and anything it did is published.
            await net.call("net.vm.prepare", {"vm": "marker", "network": {}})
            kv = await nc.jetstream().key_value(VMS.name)
            marker = Vm(VmSpec(name="marker", image="base"), VmStatus("running", 1, now(), now()))
            await kv.put(f"{node_id}.marker", msgspec.json.encode(marker))
            await eventually(lambda: asyncio.sleep(0, [e for e in events.of_type("net.applied") if e.vm == "marker"]),
                             what="the watch reached the marker")

            applied = [e.detail["active"] for e in events.of_type("net.applied") if e.vm == "web"]
            assert applied == [True, False], "one net.applied for the start, one for the stop"
            assert not [e for e in events.of_type("net.failed") if e.vm == "web"]
            await net.call("net.vm.release", {"vm": "marker"})
            await kv.delete(f"{node_id}.marker")
    finally:
        await events.stop()
        await node.shutdown()
        shutil.rmtree(node.config.state_dir, ignore_errors=True)
