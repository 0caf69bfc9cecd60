"""Two nodes, each its own `python -m edgevm.netplumb` process in its own namespace, joined by a virtual network.

The nodes share one machine: each service drives its own namespace (EDGEVM_NODE_NETNS), and a veth between
the two namespaces is the underlay the VXLAN overlay runs on.
"""

import asyncio
from ipaddress import IPv4Interface

import pytest

from conftest import start_netplumb_process, vm_nic, wait_ready
from edgevm.netplumb.drivers.links import open_links

pytestmark = pytest.mark.root


def underlay(lab):
    """Two node namespaces joined by a veth `ul0` with 192.168.200.1 and .2."""
    node1, node2 = lab.netns("n1"), lab.netns("n2")
    with open_links(node1) as links:
        links.ensure_veth("ul0", "ul0", node2)
    for node, address in ((node1, "192.168.200.1/24"), (node2, "192.168.200.2/24")):
        with open_links(node) as links:
            links.ensure_addresses("ul0", [IPv4Interface(address)])
            links.ensure_up("ul0")
    return node1, node2


async def test_vms_on_two_nodes_meet_at_their_virtual_ips_and_allow_outbound_gates_new_connections(
        lab, nats_server, nc, tmp_path):
    node1, node2 = await asyncio.to_thread(underlay, lab)
    tag = lab.prefix[9:15]
    services = [start_netplumb_process(nats_server.url, nc, netns, tmp_path / f"{netns}.log", f"np-{tag}-{i}")
                for i, netns in ((1, node1), (2, node2))]
    try:
        one, two = services
        for service in services:
            await wait_ready(service.client)
        await one.call("net.vnet.create", {"name": "overlay", "cidr": "172.16.0.0/24", "vni": 77,
                                           "peers": ["192.168.200.1", "192.168.200.2"]})
        vnet2 = await two.call("net.vnet.create", {"name": "overlay", "cidr": "172.16.0.0/24", "vni": 77,
                                                   "peers": ["192.168.200.1", "192.168.200.2"]})
        assert vnet2["peers"] == ["192.168.200.1"], "a node's own underlay address is no peer"
        assert (await one.call("net.vnet.list"))["vnets"][0]["name"] == "overlay"
        # vm1 in a VRF of node 1, vm2 in node 2's default VRF: both paths of the 1:1 NAT.
        await one.call("net.vrf.create", {"name": "red", "subnet": "10.0.0.0/24"})
        vms = {}
        for service, netns, vm, vrf, vip, outbound in ((one, node1, "vm1", "red", "172.16.0.11", True),
                                                        (two, node2, "vm2", "default", "172.16.0.12", False)):
            prepared = await service.call("net.vm.prepare", {"vm": vm, "network": {"vrf": vrf, "virtual_networks": [
                {"network": "overlay", "virtual_ip": vip, "allow_outbound": outbound}]}})
            nic = prepared["nics"][0]
            vms[vm] = await asyncio.to_thread(vm_nic, lab, netns, vm, nic["address"], nic["gateway"])
            await asyncio.to_thread(lab.serve, vms[vm], 80, vm)
            status = await service.call("net.vm.activate", {"vm": vm})
            assert status["virtual_networks"] == [{"network": "overlay", "virtual_ip": vip, "allow_outbound": outbound}]

        assert await asyncio.to_thread(lab.tcp, vms["vm1"], "172.16.0.12", 80) == "vm2 172.16.0.11"
        assert await asyncio.to_thread(lab.ping, vms["vm1"], "172.16.0.12")
        assert await asyncio.to_thread(lab.tcp, vms["vm2"], "172.16.0.11", 80) is None, "vm2 may not open one"

        in_use = await two.error("net.vnet.delete", {"name": "overlay"})
        assert (in_use.code, in_use.field) == ("409", "name")
        await two.call("net.vm.deactivate", {"vm": "vm2"})
        assert await asyncio.to_thread(lab.tcp, vms["vm1"], "172.16.0.12", 80) is None, "rules only while it runs"
        await two.call("net.vm.release", {"vm": "vm2"})
        await two.call("net.vnet.delete", {"name": "overlay"})
        assert (await two.call("net.vnet.list"))["vnets"] == []
    finally:
        for service in services:
            await service.shutdown()
