"""`ip netns exec <node> python -m edgevm.netplumb`: the service truly inside the node's namespace.

No EDGEVM_NODE_NETNS: the namespace the process runs in is the node's world, as when two nodes share a
machine. The node's NATS is reached through a loopback port of the node namespace that this test relays to
the session's nats-server; a LAN host wired to the node reaches a VM in a VRF through a port mapping.
"""

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
from pyroute2 import netns as pyroute2_netns
from tests.helpers import ServiceProcess

from conftest import NetNode, vm_nic, wait_ready
from edgevm.netplumb.drivers import netns as ns
from edgevm.netplumb.drivers.links import open_links
from edgevm.shared.client import Client

pytestmark = pytest.mark.root

NODE_LAN, LAN_HOST = "192.168.140.1", "192.168.140.2"


class ServiceInNetns(ServiceProcess):
    """A service process started by `ip netns exec`, so its own namespace is `netns`."""

    def __init__(self, name: str, netns: str, env: dict[str, str], log_path) -> None:
        super().__init__(name, env, log_path)
        self.netns = netns

    def start(self) -> "ServiceInNetns":
        log = self.log_path.open("ab")
        argv = ["ip", "netns", "exec", self.netns, sys.executable, "-m", f"edgevm.{self.name}"]
        self.process = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self


async def relay(netns: str, url: str) -> tuple[asyncio.Server, int]:
    """A loopback port inside `netns` whose connections are relayed to `url` (in this process's namespace)."""
    target = urlsplit(url)
    listener = pyroute2_netns.create_socket(netns, socket.AF_INET, socket.SOCK_STREAM, flags=0)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(target.hostname, target.port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(connected, sock=listener)
    return server, listener.getsockname()[1]


def kinds(netns: str | None, *links: str) -> list[str | None]:
    """The kind of each named link in a namespace (None: this test's own), None where there is none."""
    with open_links(netns) as found:
        return [found.kind(name) for name in links]


def edgevm_tables(netns: str) -> list[str]:
    """The names of the nftables tables of a namespace."""
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", "-j", "list", "tables"], capture_output=True,
                         text=True, check=True).stdout
    return [item["table"]["name"] for item in json.loads(out)["nftables"] if "table" in item]


async def test_a_service_inside_the_node_namespace_plumbs_that_namespace_only(lab, node, nats_server, nc, tmp_path):
    lan = await asyncio.to_thread(lab.host, node, "lan", "lan0", f"{NODE_LAN}/24", f"{LAN_HOST}/24")
    server, port = await relay(node, nats_server.url)
    name = f"np-{lab.prefix[9:15]}"
    env = {"EDGEVM_NODE": name, "EDGEVM_NATS_URL": f"nats://127.0.0.1:{port}", "EDGEVM_STATE_DIR": str(tmp_path),
           "EDGEVM_NETNS_PREFIX": f"{node}-", "EDGEVM_DEFAULT_SUBNET": "10.141.0.0/24",
           "EDGEVM_NET_RECONCILE_INTERVAL": "0", "EDGEVM_LOG_LEVEL": "INFO",
           "EDGEVM_NODE_NETNS": ""}  # unset: the namespace it runs in is the node's
    process = ServiceInNetns("netplumb", node, env, tmp_path / "netplumb.log").start()
    service = NetNode(name, node, Client(nc, name, timeout=15), process=process)
    try:
        await wait_ready(service.client)
        await service.call("net.vrf.create", {"name": "red", "subnet": "10.142.0.0/24"})
        prepared = await service.call("net.vm.prepare", {"vm": "web", "network": {"vrf": "red", "port_mappings": [
            {"host_interface": "lan0", "host_port": 8080, "vm_port": 80}]}})
        nic = prepared["nics"][0]
        vm = await asyncio.to_thread(vm_nic, lab, node, "web", nic["address"], nic["gateway"])
        await asyncio.to_thread(lab.serve, vm, 80, "web")
        await service.call("net.vm.activate", {"vm": "web"})

        assert await asyncio.to_thread(lab.tcp, lan, NODE_LAN, 8080) == f"web {LAN_HOST}"
        assert await service.call("net.reconcile") == {"changes": [], "failures": []}
        assert "edgevm" in await asyncio.to_thread(edgevm_tables, node)
        assert await asyncio.to_thread(kinds, node, "evh-red", "evbr-default") == ["bridge", "bridge"]
        assert await asyncio.to_thread(kinds, None, "evh-red", "evu-red", "evbr-default") == [None, None, None], \
            "nothing lands in the namespace the test (and `ip netns exec`) started from"
        assert not ns.exists(f"{node}-red"), "the VRF namespace is named inside the service's own mount namespace"
    finally:
        await asyncio.to_thread(process.stop, signal.SIGTERM)
        server.close()
    assert "edgevm-netplumb serving node" in process.log()
