"""The netplumb service's VRFs, VM NICs and network-config over NATS, in this process, with real traffic."""

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import vm_nic
from edgevm.netplumb.drivers import netns as ns
from edgevm.netplumb.drivers.links import open_links

pytestmark = pytest.mark.root

NETPLAN_AWK = Path(__file__).parents[1] / "guest" / "netplan.awk"
# Real cloud-init (Debian's python3-cloud-init) parses a network-config the way a guest's cloud-init does.
CLOUD_INIT_PARSE = """
import sys, yaml
from cloudinit.net import network_state
state = network_state.parse_net_config_data(yaml.safe_load(sys.stdin))
for iface in state.iter_interfaces():
    subnets = iface.get("subnets") or [{}]
    routes = subnets[0].get("routes") or [{}]
    address = subnets[0].get("address")
    print(iface["name"], iface["mac_address"], f"{address}/{subnets[0].get('prefix')}" if address else "-",
          routes[0].get("gateway", "-"))
"""


async def plug(lab, node, netplumb, vm, vrf="default"):
    prepared = await netplumb.call("net.vm.prepare", {"vm": vm, "network": {"vrf": vrf}})
    nic = prepared["nics"][0]
    inner = await asyncio.to_thread(vm_nic, lab, node, vm, nic["address"], nic["gateway"])
    await netplumb.call("net.vm.activate", {"vm": vm})
    await asyncio.to_thread(lab.serve, inner, 80, vm)
    return inner, nic["address"].split("/")[0]


async def test_vms_in_one_vrf_reach_each_other_and_not_another_vrf(lab, node, netplumb):
    await netplumb.call("net.vrf.create", {"name": "red", "subnet": "10.1.0.0/24"})
    await netplumb.call("net.vrf.create", {"name": "blue", "subnet": "10.2.0.0/24"})
    red1, _ = await plug(lab, node, netplumb, "red1", "red")
    _, red2_ip = await plug(lab, node, netplumb, "red2", "red")
    blue1, blue1_ip = await plug(lab, node, netplumb, "blue1", "blue")
    default1, default1_ip = await plug(lab, node, netplumb, "default1")

    assert await asyncio.to_thread(lab.tcp, red1, red2_ip, 80) == "red2 10.1.0.2"
    assert await asyncio.to_thread(lab.ping, red1, "10.1.0.1"), "the VRF gateway answers"
    assert await asyncio.to_thread(lab.tcp, red1, blue1_ip, 80) is None
    assert await asyncio.to_thread(lab.tcp, blue1, red2_ip, 80) is None
    assert await asyncio.to_thread(lab.tcp, red1, default1_ip, 80) is None
    assert await asyncio.to_thread(lab.tcp, default1, red2_ip, 80) is None


async def test_vrf_commands_and_the_default_vrf(lab, node, netplumb):
    listed = await netplumb.call("net.vrf.list")
    assert listed == {"vrfs": [{"name": "default", "subnet": "10.77.0.0/24", "gateway": "10.77.0.1"}]}
    await netplumb.call("net.vrf.create", {"name": "green", "subnet": "10.3.0.0/24"})
    assert ns.exists(f"{node}-green")
    assert (await netplumb.error("net.vrf.create", {"name": "green", "subnet": "10.4.0.0/24"})).code == "409"
    bad = await netplumb.error("net.vrf.create", {"name": "x", "subnet": "10.3.0.1/24"})
    assert (bad.code, bad.field) == ("400", "subnet")
    await netplumb.call("net.vm.prepare", {"vm": "g1", "network": {"vrf": "green"}})

    in_use = await netplumb.error("net.vrf.delete", {"name": "green"})
    assert (in_use.code, in_use.field) == ("409", "name") and "g1" in in_use.message
    assert (await netplumb.error("net.vrf.delete", {"name": "default"})).code == "409"
    assert (await netplumb.error("net.vrf.delete", {"name": "nosuch"})).code == "404"
    await netplumb.call("net.vm.release", {"vm": "g1"})
    await netplumb.call("net.vrf.delete", {"name": "green"})

    assert not ns.exists(f"{node}-green")
    assert [v["name"] for v in (await netplumb.call("net.vrf.list"))["vrfs"]] == ["default"]
    assert await asyncio.to_thread(links_of, node, "evh-green", "evu-green") == []


def links_of(netns, *names):
    """Which of the named links exist in a namespace."""
    with open_links(netns) as links:
        return [name for name in names if links.index(name) is not None]


async def test_prepare_keeps_the_vms_nic_allocates_unique_addresses_and_release_frees_them(netplumb):
    first = await netplumb.call("net.vm.prepare", {"vm": "a", "network": {}})
    again = await netplumb.call("net.vm.prepare", {"vm": "a", "network": {}, "hostname": "a.example"})
    other = await netplumb.call("net.vm.prepare", {"vm": "b", "network": {}})

    assert again == first
    nic_a, nic_b = first["nics"][0], other["nics"][0]
    assert nic_a["address"] != nic_b["address"] and nic_a["mac"] != nic_b["mac"]
    assert {nic_a["address"], nic_b["address"]} == {"10.77.0.2/24", "10.77.0.3/24"}
    assert (nic_a["gateway"], nic_a["bridge"], nic_a["tap"]) == ("10.77.0.1", "evbr-default", "evt-a-0")

    await netplumb.call("net.vm.release", {"vm": "a"})
    await netplumb.call("net.vm.release", {"vm": "a"})
    reused = await netplumb.call("net.vm.prepare", {"vm": "c", "network": {}})
    assert reused["nics"][0]["address"] == nic_a["address"], "a released address is free again"


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox is not installed")
async def test_network_config_is_read_alike_by_the_test_guest_and_real_cloud_init(lab, node, netplumb):
    await asyncio.to_thread(lab.wire, node, "lan", "eth7")
    prepared = await netplumb.call("net.vm.prepare", {"vm": "web", "network": {
        "virtual_interfaces": [{"name": "eth7", "destination": "eth1"}]}})
    nic, passthrough = prepared["nics"]
    assert (passthrough["kind"], passthrough["name"], passthrough["bridge"]) == ("passthrough", "eth1", "")
    expected = [f"eth0 {nic['mac']} {nic['address']} {nic['gateway']}", f"eth1 {passthrough['mac']} - -"]

    guest = await asyncio.to_thread(subprocess.run, ["busybox", "awk", "-f", str(NETPLAN_AWK)],
                                    input=prepared["network_config"], capture_output=True, text=True, check=True)
    assert guest.stdout.splitlines() == expected
    cloud_init = await asyncio.to_thread(subprocess.run, ["/usr/bin/python3", "-c", CLOUD_INIT_PARSE],
                                         input=prepared["network_config"], capture_output=True, text=True,
                                         check=False)
    if "No module named" in cloud_init.stderr:
        pytest.skip("Debian's cloud-init is not installed")
    assert cloud_init.stdout.splitlines() == expected, cloud_init.stderr
