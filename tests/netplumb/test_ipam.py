"""Address, MAC and uplink allocation (pure)."""

from ipaddress import IPv4Address, IPv4Network

import pytest

from edgevm.netplumb import ipam
from edgevm.netplumb.errors import ExhaustedError


@pytest.mark.parametrize(
    ("subnet", "taken", "gateway", "expected"),
    [
        ("10.0.0.0/24", [], None, "10.0.0.2"),
        ("10.0.0.0/24", ["10.0.0.2", "10.0.0.3"], None, "10.0.0.4"),
        ("10.0.0.0/24", ["10.0.0.2"], "10.0.0.254", "10.0.0.1"),
        ("10.0.0.0/24", [f"10.0.0.{n}" for n in range(2, 254)], None, "10.0.0.254"),
        ("10.0.0.0/30", [], None, "10.0.0.2"),
    ],
)
def test_allocate_address_skips_network_gateway_broadcast_and_taken(subnet, taken, gateway, expected):
    got = ipam.allocate_address(
        IPv4Network(subnet), [IPv4Address(t) for t in taken], None if gateway is None else IPv4Address(gateway)
    )
    assert got == IPv4Address(expected)


def test_allocate_address_never_hands_out_the_broadcast():
    subnet = IPv4Network("10.0.0.0/29")
    taken = [IPv4Address(f"10.0.0.{n}") for n in range(2, 7)]

    with pytest.raises(ExhaustedError):
        ipam.allocate_address(subnet, taken)


@pytest.mark.parametrize("subnet", ["10.0.0.0/31", "10.0.0.0/32"])
def test_subnets_without_room_for_a_gateway_and_a_vm_are_refused(subnet):
    with pytest.raises(ValueError):
        ipam.gateway_address(IPv4Network(subnet))


def test_mac_is_deterministic_local_unicast_and_distinct_per_nic():
    mac = ipam.mac_address("node1", "web", 0)

    assert mac == ipam.mac_address("node1", "web", 0)
    assert mac.startswith("52:54:00:") and len(mac) == 17
    assert int(mac[:2], 16) & 0b10 and not int(mac[:2], 16) & 0b1  # locally administered, unicast
    assert len({ipam.mac_address(node, vm, i) for node in ("n1", "n2") for vm in ("a", "b") for i in range(3)}) == 12


def test_mac_steps_past_taken_ones():
    first = ipam.mac_address("node1", "web", 0)

    second = ipam.mac_address("node1", "web", 0, taken=[first.upper()])

    assert second != first and second.startswith("52:54:00:")
    assert second == ipam.mac_address("node1", "web", 0, taken=[first])


def test_allocate_uplink_takes_the_first_free_31():
    pool = IPv4Network("169.254.64.0/29")

    first = ipam.allocate_uplink(pool, [])
    third = ipam.allocate_uplink(pool, [first, IPv4Network("169.254.64.2/31")])

    assert first == IPv4Network("169.254.64.0/31")
    assert third == IPv4Network("169.254.64.4/31")
    with pytest.raises(ExhaustedError):
        ipam.allocate_uplink(pool, [pool])
