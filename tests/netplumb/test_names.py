"""Link and namespace names and plans (pure)."""

from ipaddress import IPv4Address, IPv4Network

import pytest

from edgevm.netplumb import names
from edgevm.netplumb.drivers.values import plan_nic, plan_vnet, plan_vrf

LONG = "a-very-long-vrf-name-indeed"


@pytest.mark.parametrize(
    "make",
    [
        names.vrf_bridge,
        names.host_bridge,
        names.host_port,
        names.uplink,
        names.vnet_bridge,
        names.vnet_vxlan,
        names.vnet_interface,
    ],
)
@pytest.mark.parametrize("name", ["red", "exactly10c", "elevenchars", LONG, "default"])
def test_link_names_fit_the_kernel_limit_and_are_deterministic(make, name):
    assert len(make(name)) <= names.IFNAME_MAX
    assert make(name) == make(name)


def test_long_names_are_truncated_with_a_hash_that_no_plain_name_can_equal():
    assert names.tag("red") == "red"
    assert names.tag(LONG).startswith("a-v") and "_" in names.tag(LONG)
    assert names.tag(LONG) != names.tag(LONG + "x")


def test_vm_taps_and_vnet_ports_fit_and_differ():
    taps = {names.vm_tap(vm, i) for vm in ("web", LONG, LONG + "2") for i in range(2)}
    ports = {names.vnet_port(vrf, vnet) for vrf in ("red", "blue") for vnet in ("a", "b")}

    assert len(taps) == 6 and all(len(t) <= names.IFNAME_MAX for t in taps)
    assert len(ports) == 4 and all(len(p) <= names.IFNAME_MAX for p in ports)


def test_default_vrf_lives_in_the_node_namespace():
    default = plan_vrf("default", "10.0.0.0/24")

    assert default.netns is None and default.is_default
    assert default.host_bridge == default.bridge == "evbr-default"
    assert default.gateway == IPv4Address("10.0.0.1")


def test_vrf_plan_has_its_namespace_and_uplink():
    red = plan_vrf("red", "10.0.0.0/24", uplink="169.254.64.2/31", netns_prefix="edgevm-t-1-")

    assert red.netns == "edgevm-t-1-red"
    assert (red.bridge, red.host_bridge) == ("evbr-red", "evh-red")
    assert (str(red.uplink_node), str(red.uplink_vrf)) == ("169.254.64.2/31", "169.254.64.3/31")
    assert str(red.gateway_interface) == "10.0.0.1/24"
    assert plan_vrf("red", "10.0.0.0/24", uplink="169.254.64.2/31").netns == "edgevm-red"


@pytest.mark.parametrize("uplink", [None, "169.254.64.0/30"])
def test_a_non_default_vrf_needs_a_31_uplink(uplink):
    with pytest.raises(ValueError):
        plan_vrf("red", "10.0.0.0/24", uplink=uplink)


def test_nic_plan_is_deterministic():
    red = plan_vrf("red", "10.0.0.0/24", uplink="169.254.64.0/31")

    nic = plan_nic("node1", "web", 0, red, "10.0.0.7")

    assert nic == plan_nic("node1", "web", 0, red, "10.0.0.7")
    assert str(nic.address) == "10.0.0.7/24" and nic.tap == "evt-web-0" and nic.vrf == "red"


def test_vnet_plan_sorts_peers_and_drops_itself():
    vnet = plan_vnet("overlay", "172.16.0.0/24", 7, "192.0.2.1", ["192.0.2.3", "192.0.2.1", "192.0.2.2", "192.0.2.3"])

    assert vnet.peers == (IPv4Address("192.0.2.2"), IPv4Address("192.0.2.3"))
    assert vnet.cidr == IPv4Network("172.16.0.0/24")
    assert (vnet.bridge, vnet.vxlan, vnet.interface) == ("evn-overlay", "evx-overlay", "evi-overlay")
