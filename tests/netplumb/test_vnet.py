"""Virtual networks with real traffic: 1:1 NAT of virtual IPs, allow_outbound, VXLAN between nodes."""

from ipaddress import IPv4Address, IPv4Interface

import pytest

from edgevm.netplumb.drivers import vxlan
from edgevm.netplumb.drivers.links import open_links
from edgevm.netplumb.drivers.values import VirtualIpRule, plan_vnet
from edgevm.netplumb.drivers.vnet import ensure_attachment, ensure_vnet, remove_attachment, remove_vnet

pytestmark = pytest.mark.root


def vip(vm_address, virtual_ip, allow_outbound, vrf, vnet="overlay"):
    return VirtualIpRule(IPv4Address(vm_address), IPv4Address(virtual_ip), allow_outbound, vnet, vrf)


def attach(node, vnet, vrfs, rules):
    """Ensures the vnet and every VRF's attachment holding its VMs' virtual IPs."""
    ensure_vnet(vnet, node)
    for vrf in vrfs:
        ips = [r.virtual_ip for r in rules if r.vrf == vrf.name and r.vnet == vnet.name]
        if ips:
            ensure_attachment(vnet, vrf, ips, node)


def test_virtual_ips_answer_inbound_and_allow_outbound_gates_new_connections(lab, node):
    lab.host(node, "underlay", "ul0", "192.168.200.1/24", "192.168.200.9/24")
    red = lab.vrf(node, "red", "10.1.0.0/24")
    blue = lab.vrf(node, "blue", "10.2.0.0/24")
    default = lab.vrf(node, "default", "10.50.0.0/24")
    vnet = plan_vnet("overlay", "172.16.0.0/24", 42, "192.168.200.1")
    rules = [
        vip("10.1.0.5", "172.16.0.11", True, "red"),
        vip("10.2.0.5", "172.16.0.12", False, "blue"),
        vip("10.50.0.5", "172.16.0.13", False, "default"),
    ]
    vrfs = [red, blue, default]
    lab.converge(node, vrfs, virtual_ips=rules)
    attach(node, vnet, vrfs, rules)
    red1 = lab.vm(node, red, "red1", "10.1.0.5")
    blue1 = lab.vm(node, blue, "blue1", "10.2.0.5")
    default1 = lab.vm(node, default, "default1", "10.50.0.5")
    for name, vm in (("red1", red1), ("blue1", blue1), ("default1", default1)):
        lab.serve(vm, 80, name)

    # Inbound to a virtual IP reaches the VM; the VM sees the caller's virtual IP (1:1 both ways).
    assert lab.tcp(red1, "172.16.0.12", 80) == "blue1 172.16.0.11"
    assert lab.tcp(red1, "172.16.0.13", 80) == "default1 172.16.0.11"
    assert lab.ping(red1, "172.16.0.12")
    # blue1 and default1 may answer (above) but not open connections into the network.
    assert lab.tcp(blue1, "172.16.0.11", 80) is None
    assert lab.tcp(default1, "172.16.0.11", 80) is None
    # The virtual network is no bridge between the VRFs' own subnets.
    assert lab.tcp(red1, "10.2.0.5", 80) is None


def test_ensure_vnet_and_attachment_are_idempotent_and_removable(lab, node):
    lab.host(node, "underlay", "ul0", "192.168.200.1/24", "192.168.200.9/24")
    red = lab.vrf(node, "red", "10.1.0.0/24")
    lab.converge(node, [red])
    vnet = plan_vnet("overlay", "172.16.0.0/24", 42, "192.168.200.1", ["192.168.200.2"])

    assert ensure_vnet(vnet, node)
    assert ensure_attachment(vnet, red, [IPv4Address("172.16.0.11")], node)
    assert ensure_vnet(vnet, node) == []
    assert ensure_attachment(vnet, red, [IPv4Address("172.16.0.11")], node) == []

    moved = plan_vnet("overlay", "172.16.0.0/24", 42, "192.168.200.1", ["192.168.200.3", "192.168.200.4"])
    assert ensure_vnet(moved, node) == [
        f"{node}: removed peer 192.168.200.2 from evx-overlay",
        f"{node}: added peer 192.168.200.3 to evx-overlay",
        f"{node}: added peer 192.168.200.4 to evx-overlay",
    ]
    with open_links(node) as links:
        assert vxlan.peers(links, vnet.vxlan) == {IPv4Address("192.168.200.3"), IPv4Address("192.168.200.4")}

    assert remove_attachment(vnet, red, node)
    assert remove_vnet(vnet, node)
    with open_links(node) as links:
        assert links.index(vnet.bridge) is None and links.index(vnet.vxlan) is None
    with open_links(red.netns) as links:
        assert links.index(vnet.interface) is None


def test_vxlan_joins_vms_on_two_nodes_at_their_virtual_ips(lab):
    node1, node2 = lab.netns("n1"), lab.netns("n2")
    with open_links(node1) as links:
        links.ensure_veth("ul0", "ul0", node2)
    for node, address in ((node1, "192.168.200.1/24"), (node2, "192.168.200.2/24")):
        with open_links(node) as links:
            links.ensure_addresses("ul0", [IPv4Interface(address)])
            links.ensure_up("ul0")
    # Both nodes use the same VRF name, subnet and VM address: only the virtual IPs differ.
    red1 = lab.vrf(node1, "red", "10.0.0.0/24")
    red2 = lab.vrf(node2, "red", "10.0.0.0/24")
    rules1 = [vip("10.0.0.5", "172.16.0.11", True, "red")]
    rules2 = [vip("10.0.0.5", "172.16.0.12", False, "red")]
    lab.converge(node1, [red1], virtual_ips=rules1)
    lab.converge(node2, [red2], virtual_ips=rules2)
    attach(node1, plan_vnet("overlay", "172.16.0.0/24", 77, "192.168.200.1", ["192.168.200.2"]), [red1], rules1)
    attach(node2, plan_vnet("overlay", "172.16.0.0/24", 77, "192.168.200.2", ["192.168.200.1"]), [red2], rules2)
    vm1 = lab.vm(node1, red1, "vm1", "10.0.0.5")
    vm2 = lab.vm(node2, red2, "vm2", "10.0.0.5")
    lab.serve(vm1, 80, "vm1")
    lab.serve(vm2, 80, "vm2")

    assert lab.tcp(vm1, "172.16.0.12", 80) == "vm2 172.16.0.11"
    assert lab.ping(vm1, "172.16.0.12")
    assert lab.tcp(vm2, "172.16.0.11", 80) is None, "vm2 has allow_outbound false"
