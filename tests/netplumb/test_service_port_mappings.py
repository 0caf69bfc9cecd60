"""The netplumb service over NATS, in this process, driving a lab namespace: port mappings with real traffic.

A LAN host reaches a VM (a namespace behind a veth named like its tap) through `host_interface:host_port`
only while the VM is active; every rule comes from `net.vm.prepare` + `net.vm.activate`.
"""

import asyncio
import subprocess

import pytest
from tests.helpers import EventCollector, eventually

from conftest import ruleset, vm_nic

pytestmark = pytest.mark.root

NODE_LAN = "192.168.100.1"
LAN_HOST = "192.168.100.2"


def mapping(host_port, vm_port, protocol="tcp", host_interface="lan0"):
    return {"host_interface": host_interface, "host_port": host_port, "vm_port": vm_port, "protocol": protocol}


async def start_vm(lab, node, netplumb, vm, network):
    """Prepares a VM, plugs a namespace in as its NIC, and activates it; returns (namespace, prepared)."""
    prepared = await netplumb.call("net.vm.prepare", {"vm": vm, "network": network})
    nic = prepared["nics"][0]
    inner = await asyncio.to_thread(vm_nic, lab, node, vm, nic["address"], nic["gateway"])
    await netplumb.call("net.vm.activate", {"vm": vm})
    return inner, prepared





@pytest.fixture
async def lan(lab, node):
    return await asyncio.to_thread(lab.host, node, "lan", "lan0", f"{NODE_LAN}/24", f"{LAN_HOST}/24")


async def test_tcp_udp_and_null_protocol_reach_the_vm_while_it_runs(lab, node, netplumb, lan, nc):
    events = await EventCollector().start(nc, f"edgevm.evt.{netplumb.node}.net.>")
    await netplumb.call("net.vrf.create", {"name": "red", "subnet": "10.9.0.0/24"})
    network = {"vrf": "red", "port_mappings": [
        mapping(8080, 80, "tcp"), mapping(5353, 53, "udp"), mapping(9000, 7000, None)]}
    vm, prepared = await start_vm(lab, node, netplumb, "web", network)
    for port, ident, udp in ((80, "tcp80", False), (53, "udp53", True), (7000, "tcp7000", False),
                             (7000, "udp7000", True)):
        await asyncio.to_thread(lab.serve, vm, port, ident, udp)

    assert await asyncio.to_thread(lab.tcp, lan, NODE_LAN, 8080) == f"tcp80 {LAN_HOST}"
    assert await asyncio.to_thread(lab.udp, lan, NODE_LAN, 5353) == f"udp53 {LAN_HOST}"
    assert await asyncio.to_thread(lab.tcp, lan, NODE_LAN, 9000) == f"tcp7000 {LAN_HOST}"
    assert await asyncio.to_thread(lab.udp, lan, NODE_LAN, 9000) == f"udp7000 {LAN_HOST}"
    assert await asyncio.to_thread(lab.udp, lan, NODE_LAN, 8080) is None, "a tcp mapping carries no udp"
    status = await netplumb.call("net.status", {"vm": "web"})
    assert status["ip_addresses"] == [prepared["nics"][0]["address"].split("/")[0]]
    assert [m["host_port"] for m in status["port_mappings"]] == [8080, 5353, 9000]

    await netplumb.call("net.vm.deactivate", {"vm": "web"})

    assert await asyncio.to_thread(lab.tcp, lan, NODE_LAN, 8080) is None
    assert await asyncio.to_thread(lab.udp, lan, NODE_LAN, 5353) is None
    assert await asyncio.to_thread(lab.tcp, lan, NODE_LAN, 9000) is None
    assert (await netplumb.call("net.status", {"vm": "web"}))["port_mappings"] == []
    applied = await eventually(lambda: asyncio.sleep(0, [e for e in events.of_type("net.applied") if e.vm == "web"]),
                               what="net.applied events")
    assert [e.detail["active"] for e in applied][:2] == [True, False]
    await events.stop()


async def test_a_default_vrf_vm_is_reached_and_reactivation_restores_the_mapping(lab, node, netplumb, lan):
    vm, prepared = await start_vm(lab, node, netplumb, "db", {"port_mappings": [mapping(5432, 5432)]})
    await asyncio.to_thread(lab.serve, vm, 5432, "db")
    assert prepared["nics"][0]["bridge"] == "evbr-default"
    assert prepared["nics"][0]["address"] == "10.77.0.2/24"

    assert await asyncio.to_thread(lab.tcp, lan, NODE_LAN, 5432) == f"db {LAN_HOST}"
    await netplumb.call("net.vm.deactivate", {"vm": "db"})
    assert await asyncio.to_thread(lab.tcp, lan, NODE_LAN, 5432) is None
    await netplumb.call("net.vm.activate", {"vm": "db"})
    await netplumb.call("net.vm.activate", {"vm": "db"})
    assert await asyncio.to_thread(lab.tcp, lan, NODE_LAN, 5432) == f"db {LAN_HOST}"

    await netplumb.call("net.vm.release", {"vm": "db"})
    assert await asyncio.to_thread(lab.tcp, lan, NODE_LAN, 5432) is None
    assert (await netplumb.error("net.status", {"vm": "db"})).code == "404"


BAD_INPUT = [
    ("unknown interface", {"port_mappings": [mapping(8080, 80, host_interface="nosuch0")]},
     "400", "network.port_mappings[0].host_interface"),
    ("port 0", {"port_mappings": [mapping(0, 80)]}, "400", "network.port_mappings[0].host_port"),
    ("port 70000", {"port_mappings": [mapping(70000, 80)]}, "400", "network.port_mappings[0].host_port"),
    ("vm port 70000", {"port_mappings": [mapping(8081, 70000)]}, "400", "network.port_mappings[0].vm_port"),
    ("duplicate mapping", {"port_mappings": [mapping(9999, 80), mapping(2222, 22)]},
     "409", "network.port_mappings[1].host_port"),
    ("null protocol over a taken udp port", {"port_mappings": [mapping(5353, 53, None)]},
     "409", "network.port_mappings[0].host_port"),
    ("virtual IP outside the network", {"virtual_networks": [{"network": "overlay", "virtual_ip": "172.31.0.5"}]},
     "400", "network.virtual_networks[0].virtual_ip"),
    ("virtual IP not an address", {"virtual_networks": [{"network": "overlay", "virtual_ip": "172.16.0.300"}]},
     "400", "network.virtual_networks[0].virtual_ip"),
    ("virtual IP taken", {"virtual_networks": [{"network": "overlay", "virtual_ip": "172.16.0.10"}]},
     "409", "network.virtual_networks[0].virtual_ip"),
    ("unknown virtual network", {"virtual_networks": [{"network": "nosuch", "virtual_ip": "172.16.0.11"}]},
     "404", "network.virtual_networks[0].network"),
    ("unknown VRF", {"vrf": "nosuch"}, "404", "network.vrf"),
    ("unknown virtual interface", {"virtual_interfaces": [{"name": "nosuch0", "destination": "eth1"}]},
     "400", "network.virtual_interfaces[0].name"),
]


async def test_bad_input_is_refused_naming_the_field_and_nothing_is_applied(lab, node, netplumb, lan):
    await netplumb.call("net.vnet.create", {"name": "overlay", "cidr": "172.16.0.0/24", "vni": 42,
                                            "peers": ["192.168.100.9"]})
    await start_vm(lab, node, netplumb, "holder", {
        "port_mappings": [mapping(2222, 22), mapping(5353, 53, "udp")],
        "virtual_networks": [{"network": "overlay", "virtual_ip": "172.16.0.10"}]})
    before = await asyncio.to_thread(ruleset, node)

    for what, network, code, field in BAD_INPUT:
        error = await netplumb.error("net.vm.prepare", {"vm": "bad", "network": network})
        assert (error.code, error.field) == (code, field), what
        assert field in error.message, what

    assert (await netplumb.error("net.status", {"vm": "bad"})).code == "404"
    assert await asyncio.to_thread(ruleset, node) == before
    assert (await netplumb.error("net.vm.activate", {"vm": "bad"})).code == "404"


async def test_a_running_vm_is_released_only_once_its_rules_are_gone(lab, node, netplumb, lan):
    await netplumb.call("net.vrf.create", {"name": "red", "subnet": "10.9.0.0/24"})
    _, prepared = await start_vm(lab, node, netplumb, "web", {"vrf": "red", "port_mappings": [mapping(8080, 80)]})
    # The VRF's namespace vanishes behind netplumb's back: web's rules there cannot be removed now.
    await asyncio.to_thread(subprocess.run, ["ip", "netns", "delete", f"{node}-red"], check=True)

    refused = await netplumb.error("net.vm.release", {"vm": "web"})

    assert refused.code == "503" and f"{node}-red" in refused.message
    kept = await netplumb.call("net.status", {"vm": "web"})
    assert kept["ip_addresses"] == [prepared["nics"][0]["address"].split("/")[0]], "web's address is not free yet"
    repaired = await netplumb.call("net.reconcile")
    assert repaired["failures"] == [] and f"created network namespace {node}-red" in repaired["changes"]
    await netplumb.call("net.vm.release", {"vm": "web"})
    assert (await netplumb.error("net.status", {"vm": "web"})).code == "404"
