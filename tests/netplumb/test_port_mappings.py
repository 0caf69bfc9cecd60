"""Host port mappings with real traffic: a LAN host reaches VMs through the node's interface."""

import subprocess
from ipaddress import IPv4Address

import pytest

from edgevm.netplumb.drivers.values import PortMappingRule

pytestmark = pytest.mark.root

NODE_LAN = "192.168.100.1"
LAN_HOST = "192.168.100.2"


def mapping(protocol, host_port, vm_address, vm_port, vrf):
    return PortMappingRule(protocol, "lan0", host_port, IPv4Address(vm_address), vm_port, vrf)


@pytest.fixture
def site(lab, node):
    """A node with a LAN host, two VRFs with the same subnet, a default VRF, and one VM in each."""
    lan = lab.host(node, "lan", "lan0", f"{NODE_LAN}/24", f"{LAN_HOST}/24")
    red = lab.vrf(node, "red", "10.9.0.0/24")
    blue = lab.vrf(node, "blue", "10.9.0.0/24")
    default = lab.vrf(node, "default", "10.50.0.0/24")
    lab.converge(node, [red, blue, default])
    vms = {
        "red": lab.vm(node, red, "vm-red", "10.9.0.5"),
        "blue": lab.vm(node, blue, "vm-blue", "10.9.0.5"),
        "default": lab.vm(node, default, "vm-default", "10.50.0.5"),
    }
    for vrf, vm in vms.items():
        lab.serve(vm, 80, f"{vrf}-tcp")
        lab.serve(vm, 53, f"{vrf}-udp", udp=True)
    return lan, [red, blue, default], vms


def test_tcp_udp_and_both_reach_the_right_vm_across_overlapping_vrfs(lab, node, site):
    lan, vrfs, _ = site
    rules = [
        mapping("tcp", 8080, "10.9.0.5", 80, "red"),
        mapping("udp", 5353, "10.9.0.5", 53, "red"),
        mapping(None, 8081, "10.9.0.5", 80, "blue"),
        mapping(None, 5354, "10.9.0.5", 53, "blue"),
        mapping("tcp", 8082, "10.50.0.5", 80, "default"),
    ]

    lab.converge(node, vrfs, rules)

    # The VM sees the LAN host's own address: the mapping only rewrites destinations.
    assert lab.tcp(lan, NODE_LAN, 8080) == f"red-tcp {LAN_HOST}"
    assert lab.udp(lan, NODE_LAN, 5353) == f"red-udp {LAN_HOST}"
    assert lab.tcp(lan, NODE_LAN, 8081) == f"blue-tcp {LAN_HOST}"
    assert lab.udp(lan, NODE_LAN, 5354) == f"blue-udp {LAN_HOST}"
    assert lab.tcp(lan, NODE_LAN, 8082) == f"default-tcp {LAN_HOST}"
    assert lab.udp(lan, NODE_LAN, 8080) is None, "a tcp mapping carries no udp"
    assert lab.tcp(lan, NODE_LAN, 5353) is None, "a udp mapping carries no tcp"


def test_null_protocol_carries_tcp_and_udp_to_the_same_port(lab, node, site):
    lan, vrfs, vms = site
    lab.serve(vms["blue"], 7000, "blue-tcp-7000")
    lab.serve(vms["blue"], 7000, "blue-udp-7000", udp=True)

    lab.converge(node, vrfs, [mapping(None, 9000, "10.9.0.5", 7000, "blue")])

    assert lab.tcp(lan, NODE_LAN, 9000) == f"blue-tcp-7000 {LAN_HOST}"
    assert lab.udp(lan, NODE_LAN, 9000) == f"blue-udp-7000 {LAN_HOST}"


def test_removing_a_mapping_closes_the_port(lab, node, site):
    lan, vrfs, _ = site
    lab.converge(
        node, vrfs, [mapping("tcp", 8080, "10.9.0.5", 80, "red"), mapping("tcp", 8082, "10.50.0.5", 80, "default")]
    )
    assert lab.tcp(lan, NODE_LAN, 8080) == f"red-tcp {LAN_HOST}"

    lab.converge(node, vrfs, [mapping("tcp", 8082, "10.50.0.5", 80, "default")])

    assert lab.tcp(lan, NODE_LAN, 8080) is None
    assert lab.tcp(lan, NODE_LAN, 8082) == f"default-tcp {LAN_HOST}"


def test_the_lan_reaches_vms_only_through_mappings(lab, node, site):
    lan, vrfs, _ = site
    lab.converge(node, vrfs, [mapping("tcp", 8080, "10.9.0.5", 80, "red")])
    red = vrfs[0]
    subprocess.run(["ip", "-n", lan, "route", "add", "10.50.0.0/24", "via", NODE_LAN], check=True)

    assert lab.tcp(lan, "10.50.0.5", 80) is None, "the default VRF is not routed from the LAN"
    assert lab.tcp(lan, str(red.uplink_vrf.ip), 80) is None, "a VRF's uplink opens only mapped ports"


def test_vms_reach_the_lan_through_masquerade(lab, node, site):
    lan, vrfs, vms = site
    lab.converge(node, vrfs)
    lab.serve(lan, 9999, "lan")

    assert lab.tcp(vms["red"], LAN_HOST, 9999) == f"lan {NODE_LAN}"
    assert lab.tcp(vms["blue"], LAN_HOST, 9999) == f"lan {NODE_LAN}"
    assert lab.tcp(vms["default"], LAN_HOST, 9999) == f"lan {NODE_LAN}"


def test_mapped_flows_are_tracked_in_the_vrf_namespace(lab, node, site):
    lan, vrfs, _ = site
    lab.converge(node, vrfs, [mapping("tcp", 8080, "10.9.0.5", 80, "red")])

    assert lab.tcp(lan, NODE_LAN, 8080) == f"red-tcp {LAN_HOST}"

    listed = subprocess.run(
        ["ip", "netns", "exec", vrfs[0].netns, "conntrack", "-L", "-p", "tcp"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Original direction from the LAN host to the uplink port, reply direction from the VM's port 80.
    assert any(
        f"src={LAN_HOST}" in line and "dport=8080" in line and "src=10.9.0.5" in line and "sport=80" in line
        for line in listed.splitlines()
    ), listed
