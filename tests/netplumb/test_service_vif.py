"""Virtual interfaces through the service: a host interface's traffic goes to the VM's passthrough NIC."""

import asyncio

import pytest
from tests.helpers import EventCollector, eventually

from conftest import vm_nic

pytestmark = pytest.mark.root


async def test_a_virtual_interface_carries_all_traffic_only_while_the_vm_runs(lab, node, netplumb):
    lan = await asyncio.to_thread(lab.wire, node, "lan", "eth7", "192.168.50.2/24")
    prepared = await netplumb.call("net.vm.prepare", {"vm": "fw", "network": {
        "virtual_interfaces": [{"name": "eth7", "destination": "eth1"}]}})
    nic, passthrough = prepared["nics"]
    assert passthrough["tap"] == "evt-fw-1"
    await asyncio.to_thread(vm_nic, lab, node, "fw", nic["address"], nic["gateway"])
    # The passthrough NIC: a second namespace stands for it (its eth0 is the guest's eth1).
    wan = await asyncio.to_thread(lab.wire, node, "fw-eth1", passthrough["tap"], "192.168.50.3/24")
    await asyncio.to_thread(lab.serve, wan, 80, "fw")
    assert await asyncio.to_thread(lab.tcp, lan, "192.168.50.3", 80) is None

    await netplumb.call("net.vm.activate", {"vm": "fw"})
    assert await asyncio.to_thread(lab.tcp, lan, "192.168.50.3", 80) == "fw 192.168.50.2"
    assert (await netplumb.call("net.status", {"vm": "fw"}))["virtual_interfaces"] == [
        {"name": "eth7", "destination": "eth1"}]
    taken = await netplumb.error("net.vm.prepare", {"vm": "other", "network": {
        "virtual_interfaces": [{"name": "eth7", "destination": "eth1"}]}})
    assert (taken.code, taken.field) == ("409", "network.virtual_interfaces[0].name")

    await netplumb.call("net.vm.deactivate", {"vm": "fw"})
    assert await asyncio.to_thread(lab.tcp, lan, "192.168.50.3", 80) is None


async def test_a_wire_that_cannot_be_made_fails_its_vm_only(lab, node, netplumb, nc):
    events = await EventCollector().start(nc, f"edgevm.evt.{netplumb.node}.net.>")
    await asyncio.to_thread(lab.wire, node, "lan", "eth7", "192.168.50.2/24")
    await netplumb.call("net.vm.prepare", {"vm": "fw", "network": {
        "virtual_interfaces": [{"name": "eth7", "destination": "eth1"}]}})
    await netplumb.call("net.vm.prepare", {"vm": "web", "network": {}})

    # fw's passthrough tap does not exist (its domain did not really start): its activation fails.
    failed = await netplumb.error("net.vm.activate", {"vm": "fw"})
    status = await netplumb.call("net.vm.activate", {"vm": "web"})

    assert failed.code == "503" and "evt-fw-1" in failed.message
    assert status["ip_addresses"] == ["10.77.0.3"], "another VM is not held up by fw's broken wire"
    reports = await eventually(lambda: asyncio.sleep(0, [e for e in events.of_type("net.failed") if e.vm == "fw"]),
                               what="net.failed for fw")
    assert "evt-fw-1" in reports[0].detail["error"]
    [failure] = reports[0].detail["failures"]  # the same failure, typed: no wording to parse
    assert (failure["step"], failure["interface"], failure["what"]) == ("vif", "eth7", "virtual interface eth7")
    assert "evt-fw-1" in failure["error"] and reports[0].detail["error"] == f"{failure['what']}: {failure['error']}"
    await events.stop()
