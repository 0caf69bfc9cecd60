"""Virtual interfaces with real traffic: a host interface wired through to a VM's tap by tc."""

import socket

import pytest
from pyroute2 import netns as pyroute2_netns

from edgevm.netplumb.drivers.links import IFF_PROMISC, open_links
from edgevm.netplumb.drivers.values import VirtualInterfacePlan
from edgevm.netplumb.drivers.vif import ensure_virtual_interface, redirect_target, remove_virtual_interface
from edgevm.netplumb.names import vm_tap

pytestmark = pytest.mark.root


@pytest.fixture
def wired(lab, node):
    """A LAN host behind host interface `eth7` of the node, and a VM whose tap is on no bridge."""
    lan = lab.wire(node, "lan", "eth7", "192.168.50.2/24")
    vm = lab.wire(node, "vm", vm_tap("vm", 1), "192.168.50.3/24")
    lab.serve(vm, 80, "vm")
    return lan, vm, VirtualInterfacePlan(host_interface="eth7", tap=vm_tap("vm", 1))


def test_all_traffic_of_the_host_interface_reaches_the_vm_and_back(lab, node, wired):
    lan, _, plan = wired
    assert lab.tcp(lan, "192.168.50.3", 80) is None

    changes = ensure_virtual_interface(plan, node)

    assert changes
    assert lab.ping(lan, "192.168.50.3")
    assert lab.tcp(lan, "192.168.50.3", 80) == "vm 192.168.50.2"
    assert redirect_target("eth7", node) == plan.tap
    assert redirect_target(plan.tap, node) == "eth7"
    with open_links(node) as links:
        assert links.link("eth7")["flags"] & IFF_PROMISC


def test_link_local_frames_a_bridge_would_keep_pass_too(lab, node, wired):
    lan, vm, plan = wired
    ensure_virtual_interface(plan, node)
    lldp = 0x88CC
    frame = bytes.fromhex("0180c200000e") + bytes.fromhex("020000000001") + lldp.to_bytes(2, "big") + b"edgevm"
    receiver = pyroute2_netns.create_socket(vm, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(lldp), flags=0)
    sender = pyroute2_netns.create_socket(lan, socket.AF_PACKET, socket.SOCK_RAW, 0, flags=0)
    with receiver, sender:
        receiver.bind(("eth0", lldp))
        receiver.settimeout(2)
        sender.bind(("eth0", 0))

        sender.send(frame)

        assert receiver.recv(2048)[: len(frame)] == frame


def test_ensure_is_idempotent_and_remove_cuts_the_wire(lab, node, wired):
    lan, _, plan = wired
    ensure_virtual_interface(plan, node)

    assert ensure_virtual_interface(plan, node) == []

    assert remove_virtual_interface(plan, node)
    assert lab.tcp(lan, "192.168.50.3", 80) is None
    assert redirect_target("eth7", node) is None
    with open_links(node) as links:
        assert not links.link("eth7")["flags"] & IFF_PROMISC
    assert remove_virtual_interface(plan, node) == []
