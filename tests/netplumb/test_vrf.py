"""VRFs in real namespaces: idempotent ensure, removal, and isolation with real traffic."""

import json
import subprocess
import sys

import pytest

from edgevm.netplumb import names
from edgevm.netplumb.drivers import netns as ns
from edgevm.netplumb.drivers.links import open_links
from edgevm.netplumb.drivers.vrf import ensure_vrf, remove_vrf

pytestmark = pytest.mark.root


def kernel_state(*namespaces: str) -> list[object]:
    """What netplumb configures in namespaces (links, IPv4 addresses, routes), without timers or carrier."""
    state: list[object] = []
    for netns in namespaces:

        def ip(*args: str, netns: str = netns) -> list[dict]:
            out = subprocess.run(["ip", "-n", netns, "-j", *args], capture_output=True, text=True, check=True)
            return json.loads(out.stdout)

        state.append(
            sorted(
                (
                    link["ifname"],
                    link.get("linkinfo", {}).get("info_kind"),
                    link.get("master"),
                    link["mtu"],
                    "UP" in link["flags"],
                    link.get("address"),
                    link.get("promiscuity"),
                )
                for link in ip("-d", "link", "show")
            )
        )
        state.append(
            sorted(
                (item["ifname"], addr["local"], addr["prefixlen"])
                for item in ip("-4", "addr", "show")
                for addr in item["addr_info"]
            )
        )
        state.append(sorted((r["dst"], r.get("gateway"), r.get("dev")) for r in ip("-4", "route", "show")))
    return state


def sysctl(netns: str, key: str) -> str:
    return ns.read_sysctls([key], netns)[key]


def test_ensure_vrf_builds_the_layout_and_a_second_call_changes_nothing(lab, node):
    red = lab.vrf(node, "red", "10.1.0.0/24")

    first = ensure_vrf(red, node)
    before = kernel_state(node, red.netns)
    second = ensure_vrf(red, node)

    assert first, "the first ensure creates things"
    assert second == []
    assert kernel_state(node, red.netns) == before
    with open_links(red.netns) as inner:
        assert {str(a) for a in inner.addresses(red.bridge)} == {"10.1.0.1/24"}
        assert {str(a) for a in inner.addresses(names.VRF_UPLINK)} == {str(red.uplink_vrf)}
    with open_links(node) as outer:
        assert outer.addresses(red.host_bridge) == set()
        assert outer.kind(red.host_bridge) == "bridge"
    assert sysctl(red.netns, "net.ipv4.ip_forward") == "1"
    assert sysctl(node, f"net.ipv4.conf.{red.host_bridge}.forwarding") == "0"


def test_ensure_vrf_repairs_a_missing_piece(lab, node):
    red = lab.vrf(node, "red", "10.1.0.0/24")
    ensure_vrf(red, node)
    with open_links(red.netns) as inner:
        inner.ensure_addresses(red.bridge, [])

    repaired = ensure_vrf(red, node)

    assert repaired == [f"{red.netns}: added 10.1.0.1/24 to {red.bridge}"]


def test_default_vrf_is_a_gateway_bridge_in_the_node_namespace(lab, node):
    default = lab.vrf(node, "default", "10.50.0.0/24")

    ensure_vrf(default, node)

    assert default.netns is None
    with open_links(node) as outer:
        assert {str(a) for a in outer.addresses("evbr-default")} == {"10.50.0.1/24"}
    assert ensure_vrf(default, node) == []


def test_remove_vrf_takes_namespace_and_links_and_is_idempotent(lab, node):
    red = lab.vrf(node, "red", "10.1.0.0/24")
    ensure_vrf(red, node)

    removed = remove_vrf(red, node)

    assert removed
    assert not ns.exists(red.netns)
    with open_links(node) as outer:
        assert outer.index(red.host_bridge) is None
        assert outer.index(names.uplink("red")) is None
    assert remove_vrf(red, node) == []


def test_vms_in_one_vrf_reach_each_other_and_not_another_vrf(lab, node):
    red = lab.vrf(node, "red", "10.1.0.0/24")
    blue = lab.vrf(node, "blue", "10.2.0.0/24")
    lab.converge(node, [red, blue])
    red1 = lab.vm(node, red, "red1", "10.1.0.10")
    red2 = lab.vm(node, red, "red2", "10.1.0.11")
    blue1 = lab.vm(node, blue, "blue1", "10.2.0.10")
    lab.serve(red2, 80, "red2")
    lab.serve(blue1, 80, "blue1")

    assert lab.ping(red1, "10.1.0.11")
    assert lab.tcp(red1, "10.1.0.11", 80) == "red2 10.1.0.10"
    assert lab.ping(red1, "10.1.0.1"), "the VRF gateway answers"
    assert not lab.ping(red1, "10.2.0.10")
    assert lab.tcp(red1, "10.2.0.10", 80) is None
    assert lab.tcp(blue1, "10.1.0.11", 80) is None


def test_vrfs_with_the_same_subnet_stay_apart(lab, node):
    red = lab.vrf(node, "red", "10.1.0.0/24")
    blue = lab.vrf(node, "blue", "10.1.0.0/24")
    lab.converge(node, [red, blue])
    red1 = lab.vm(node, red, "red1", "10.1.0.10")
    red2 = lab.vm(node, red, "red2", "10.1.0.11")
    blue1 = lab.vm(node, blue, "blue1", "10.1.0.10")
    blue2 = lab.vm(node, blue, "blue2", "10.1.0.11")
    lab.serve(red2, 80, "red2")
    lab.serve(blue2, 80, "blue2")

    assert lab.tcp(red1, "10.1.0.11", 80) == "red2 10.1.0.10"
    assert lab.tcp(blue1, "10.1.0.11", 80) == "blue2 10.1.0.10"


def test_a_vrf_cannot_reach_another_vrfs_uplink(lab, node):
    red = lab.vrf(node, "red", "10.1.0.0/24")
    blue = lab.vrf(node, "blue", "10.2.0.0/24")
    lab.converge(node, [red, blue])
    red1 = lab.vm(node, red, "red1", "10.1.0.10")

    assert lab.ping(red1, str(red.uplink_node.ip)), "the node answers on the VRF's own uplink"
    assert not lab.ping(red1, str(blue.uplink_vrf.ip))


def test_a_vrf_may_share_the_default_vrfs_subnet(lab, node):
    lan = lab.host(node, "lan", "lan0", "192.168.100.1/24", "192.168.100.2/24")
    default = lab.vrf(node, "default", "10.1.0.0/24")
    red = lab.vrf(node, "red", "10.1.0.0/24")
    lab.converge(node, [default, red])
    default1 = lab.vm(node, default, "default1", "10.1.0.5")
    red1 = lab.vm(node, red, "red1", "10.1.0.5")
    red2 = lab.vm(node, red, "red2", "10.1.0.6")
    lab.serve(red1, 80, "red1")
    lab.serve(lan, 80, "lan")

    for _ in range(3):  # the node must never answer ARP for its own 10.1.0.1 on red's bridge
        assert lab.tcp(red2, "10.1.0.5", 80) == "red1 10.1.0.6"
        assert lab.tcp(red2, "192.168.100.2", 80) == "lan 192.168.100.1"
        assert lab.tcp(default1, "192.168.100.2", 80) == "lan 192.168.100.1"


NODE_PROCESS = """
import json, sys
from edgevm.netplumb.drivers import nft
from edgevm.netplumb.drivers.links import open_links
from edgevm.netplumb.drivers.vrf import ensure_vrf
from edgevm.netplumb.drivers.values import plan_vrf
from edgevm.netplumb.rulesets import tables

red = plan_vrf("red", "10.1.0.0/24", uplink="169.254.64.0/31", netns_prefix=sys.argv[1])
first, second = ensure_vrf(red), ensure_vrf(red)
for netns, table in tables([red], [], []).items():
    nft.ensure_table(table, netns)
with open_links() as node, open_links(red.netns) as inner:
    seen = [node.kind("evh-red"), node.kind("evu-red"), sorted(map(str, inner.addresses("evbr-red")))]
tabled = [nft.read_table("inet", "edgevm", netns) is not None for netns in (None, red.netns)]
print(json.dumps({"created": bool(first), "second": second, "seen": seen, "tables": tabled}))
"""


def test_a_node_process_inside_its_namespace_drives_that_namespace(lab, node):
    """The current namespace is the node's; the VRF namespace a node process names lives as long as it."""

    def run_node() -> dict:
        done = subprocess.run(
            ["ip", "netns", "exec", node, sys.executable, "-c", NODE_PROCESS, f"{node}-"],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(done.stdout)

    for _ in range(2):  # the second run starts over the empty file the first one's namespace left
        assert run_node() == {
            "created": True,
            "second": [],
            "seen": ["bridge", "veth", ["10.1.0.1/24"]],
            "tables": [True, True],
        }

    with open_links() as host:
        assert host.index("evh-red") is None, "nothing lands in the namespace the tests run in"
    assert not ns.exists(f"{node}-red"), "named inside the node process's own mount namespace"


def test_ensure_vrf_rebuilds_a_namespace_deleted_behind_its_back(lab, node):
    red = lab.vrf(node, "red", "10.1.0.0/24")
    lab.converge(node, [red])
    red1 = lab.vm(node, red, "red1", "10.1.0.10")

    # The kernel tears the old namespace down (and the veths into it) in the background: ensure_vrf may
    # still find their node-side ends.
    subprocess.run(["ip", "netns", "delete", red.netns], check=True)
    repaired = ensure_vrf(red, node)

    assert f"created network namespace {red.netns}" in repaired
    with open_links(red.netns) as inner:
        assert inner.kind(names.VRF_LINK) == "veth" and inner.kind(names.VRF_UPLINK) == "veth"
    assert lab.ping(red1, "10.1.0.1"), "the VM's gateway answers from the new namespace"
