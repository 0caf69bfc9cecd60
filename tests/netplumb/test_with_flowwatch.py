"""Netplumb and flowwatch of one node together: flowwatch learns the VM from netplumb's own records.

No record is written by the test: netplumb prepares and activates the VM as lifecycle would, a namespace
stands for the VM's NIC, and a LAN host connects through the port mapping; flowwatch must attribute the
connection to the VM, inbound, with the LAN host and the VM's address as its ends, and terminate it.
"""

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pyroute2 import netns as pyroute2_netns
from tests.helpers import EventCollector, eventually

from conftest import vm_nic
from edgevm.flowwatch.app import make_setup
from edgevm.shared.client import Client
from edgevm.shared.config import Config
from edgevm.shared.runtime import serve

pytestmark = pytest.mark.root

NODE_LAN, LAN_HOST = "192.168.120.1", "192.168.120.2"


@pytest.fixture
async def flowwatch(netplumb, nats_server, nc, tmp_path):
    """A flowwatch service of the same node, watching the same node namespace."""
    config = Config(netplumb.node, nats_server.url, tmp_path / "fw", "test:///default", "127.0.0.1", 0, 0, "WARNING")
    stop = asyncio.Event()
    task = asyncio.create_task(serve("flowwatch", make_setup(netplumb.netns), config, stop))
    client = Client(nc, netplumb.node, timeout=10)

    async def answers():
        if task.done():
            task.result()
        await client.call("flow.list", {"vm": "nobody", "status": "active"})

    try:
        await eventually(lambda: _answers_404(answers), timeout=30, what="flowwatch answers")
        yield client
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def _answers_404(call):
    try:
        await call()
    except Exception as exc:
        return getattr(exc, "code", None) == "404"
    return True


async def _ended(events: EventCollector, flow_id: str) -> bool:
    return any(e.flow.id == flow_id and e.flow.status == "terminated" for e in events.of_type("flow.terminated"))


def reset_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the peer's reset reaches `sock` (a read fails with ECONNRESET) within `seconds`."""
    sock.settimeout(seconds)
    try:
        sock.recv(1)  # data or an orderly close: no reset
    except ConnectionResetError:
        return True
    except TimeoutError:
        pass
    return False


async def test_a_port_mapped_connection_is_the_vms_flow_and_can_be_cut(lab, node, netplumb, flowwatch, nc, nats_server):
    events = await EventCollector().start(nc, f"edgevm.evt.{netplumb.node}.flow.web")
    lan = await asyncio.to_thread(lab.host, node, "lan", "lan0", f"{NODE_LAN}/24", f"{LAN_HOST}/24")
    await netplumb.call("net.vrf.create", {"name": "red", "subnet": "10.61.0.0/24"})
    mapping = {"host_interface": "lan0", "host_port": 8080, "vm_port": 80, "protocol": "tcp"}
    prepared = await netplumb.call("net.vm.prepare", {"vm": "web", "network": {"vrf": "red", "port_mappings": [mapping]}})
    nic = prepared["nics"][0]
    vm_ns = await asyncio.to_thread(vm_nic, lab, node, "web", nic["address"], nic["gateway"])
    await netplumb.call("net.vm.activate", {"vm": "web"})
    vm_address = nic["address"].split("/")[0]
    shown = await edgevm_cli(nats_server.url, netplumb.node, "net", "status", "web")
    assert "port mappings       tcp lan0:8080 -> 80\n" in shown.stdout, shown.stdout + shown.stderr

    server = pyroute2_netns.create_socket(vm_ns, socket.AF_INET, socket.SOCK_STREAM, flags=0)
    server.bind(("0.0.0.0", 80))
    server.listen(4)
    client = pyroute2_netns.create_socket(lan, socket.AF_INET, socket.SOCK_STREAM, flags=0)
    try:
        client.settimeout(5)
        await asyncio.to_thread(client.connect, (NODE_LAN, 8080))
        peer, _ = await asyncio.to_thread(server.accept)
        client.sendall(b"x" * 3000)
        await asyncio.to_thread(peer.recv, 65536)
        port = client.getsockname()[1]

        async def the_flow():
            flows = (await flowwatch.call("flow.list", {"vm": "web", "status": "active"}))["flows"]
            return next((f for f in flows if f["src_port"] == port), None)

        flow = await eventually(the_flow, timeout=5, what="the connection is an active flow of VM web")
        assert (flow["direction"], flow["protocol"], flow["src_ip"]) == ("inbound", "tcp", LAN_HOST)
        assert (flow["dst_ip"], flow["dst_port"]) == (vm_address, 80)

        cut = await edgevm_cli(nats_server.url, netplumb.node, "flow", "terminate", "web", flow["id"])  # as a user
        assert cut.returncode == 0, cut.stderr
        header, row = cut.stdout.splitlines()  # the terminated flow as a table row, as `flow list` shows it
        assert header.split()[:3] == ["ID", "STATUS", "PROTO"] and row.split()[:3] == [flow["id"], "terminated", "tcp"]
        assert await asyncio.to_thread(reset_within, client, 1.0), "the client got no reset within 1 s"
        # The same flow on the event stream, as the gateway reads it.
        await eventually(lambda: _ended(events, flow["id"]), timeout=5, what="flow.terminated event")
        [opened] = [e for e in events.of_type("flow.opened") if e.flow.id == flow["id"]]
        assert opened.flow.vm == "web" and opened.flow.status == "active"
    finally:
        client.close()
        server.close()


async def edgevm_cli(nats_url, node, *args):
    cmd = [str(Path(sys.executable).parent / "edgevm"), "--nats", nats_url, "--node", node, *args]
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=60)


async def test_net_and_flow_verbs_of_the_cli(lab, node, netplumb, flowwatch, nats_server):
    async def cli(*args):
        return await edgevm_cli(nats_server.url, netplumb.node, *args)

    made = await cli("net", "vrf", "create", "blue", "10.62.0.0/24")
    assert made.returncode == 0, made.stderr
    assert [line.split() for line in made.stdout.splitlines()] == [["NAME", "SUBNET", "GATEWAY"],
                                                                    ["blue", "10.62.0.0/24", "10.62.0.1"]]
    made = await cli("--json", "net", "vrf", "create", "green", "10.63.0.0/24")
    assert made.returncode == 0 and json.loads(made.stdout)["gateway"] == "10.63.0.1", made.stderr
    dropped = await cli("net", "vrf", "delete", "green")
    assert dropped.returncode == 0 and dropped.stdout == "vrf green deleted\n", dropped.stderr
    vrfs = await cli("net", "vrf", "list")
    assert vrfs.stdout.splitlines()[0].split() == ["NAME", "SUBNET", "GATEWAY"] and "blue" in vrfs.stdout
    bad = await cli("net", "vrf", "create", "red", "10.62.0.0/33")
    assert bad.returncode == 1 and "400 [subnet]" in bad.stderr
    # The lab node has no route to any peer: netplumb says so, naming the field.
    vnet = await cli("net", "vnet", "create", "over", "172.31.0.0/24", "4242", "--peer", "192.0.2.7")
    assert vnet.returncode == 1 and "422 [peers]" in vnet.stderr, vnet.stderr
    assert (await cli("net", "vnet", "list")).stdout.split() == ["NAME", "CIDR", "VNI", "PEERS"]

    await netplumb.call("net.vm.prepare", {"vm": "app", "network": {"vrf": "blue"}})
    status = json.loads((await cli("--json", "net", "status", "app")).stdout)
    assert status["vrf"] == "blue" and status["ip_addresses"][0].startswith("10.62.0.")
    shown = await cli("net", "status", "app")
    fields = {line[:20].strip(): line[20:].strip() for line in shown.stdout.splitlines()[1:]}
    assert fields["vrf"] == "blue" and fields["ip addresses"] == status["ip_addresses"][0], shown.stdout
    assert fields["port mappings"] == "" and shown.stdout.split()[:2] == ["FIELD", "VALUE"], shown.stdout
    flows = await cli("flow", "list", "app", "--status", "active")
    assert flows.returncode == 0 and flows.stdout.split() == ["ID", "STATUS", "PROTO", "DIRECTION", "SOURCE",
                                                              "DESTINATION", "STATE", "BYTES", "IN/OUT", "STARTED"]
    gone = await cli("flow", "terminate", "app", "1a21edc93f4e1c07a9b25d38f60")
    assert gone.returncode == 1 and "404" in gone.stderr
