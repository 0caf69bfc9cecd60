"""`python -m edgevm.netplumb` as its own process: killed and restarted, it loses no mapping and adds no rule."""

import asyncio
import signal
import subprocess

import pytest

from conftest import ruleset, start_netplumb_process, vm_nic, wait_ready

pytestmark = pytest.mark.root

NODE_LAN = "192.168.100.1"
LAN_HOST = "192.168.100.2"




async def test_kill_and_restart_loses_no_mapping_and_duplicates_no_rule(lab, node, nats_server, nc, tmp_path):
    lan = await asyncio.to_thread(lab.host, node, "lan", "lan0", f"{NODE_LAN}/24", f"{LAN_HOST}/24")
    service = start_netplumb_process(nats_server.url, nc, node, tmp_path / "netplumb.log", f"np-{lab.prefix[9:15]}")
    try:
        await wait_ready(service.client)
        await service.call("net.vrf.create", {"name": "red", "subnet": "10.9.0.0/24"})
        vms = {}
        for vm, vrf, port in (("web", "red", 8080), ("db", "default", 5432)):
            prepared = await service.call("net.vm.prepare", {"vm": vm, "network": {"vrf": vrf, "port_mappings": [
                {"host_interface": "lan0", "host_port": port, "vm_port": 80, "protocol": None}]}})
            nic = prepared["nics"][0]
            vms[vm] = await asyncio.to_thread(vm_nic, lab, node, vm, nic["address"], nic["gateway"])
            await asyncio.to_thread(lab.serve, vms[vm], 80, vm)
            await service.call("net.vm.activate", {"vm": vm})
        assert await asyncio.to_thread(lab.tcp, lan, NODE_LAN, 8080) == f"web {LAN_HOST}"
        red = f"{node}-red"
        before = [await asyncio.to_thread(ruleset, netns) for netns in (node, red)]

        assert service.process.stop(signal.SIGKILL) == -signal.SIGKILL
        assert await asyncio.to_thread(lab.tcp, lan, NODE_LAN, 5432) == f"db {LAN_HOST}", "the kernel keeps it"
        service.process.start()
        await wait_ready(service.client)

        assert [await asyncio.to_thread(ruleset, netns) for netns in (node, red)] == before
        assert await service.call("net.reconcile") == {"changes": [], "failures": []}
        assert await asyncio.to_thread(lab.tcp, lan, NODE_LAN, 8080) == f"web {LAN_HOST}"
        assert await asyncio.to_thread(lab.tcp, lan, NODE_LAN, 5432) == f"db {LAN_HOST}"
        assert "start-up reconcile: 0 change(s), 0 failure(s)" in service.process.log()
    finally:
        await service.shutdown()


async def test_reconcile_repairs_what_was_lost_and_removes_what_no_vm_needs(lab, node, netplumb):
    lan = await asyncio.to_thread(lab.host, node, "lan", "lan0", f"{NODE_LAN}/24", f"{LAN_HOST}/24")
    await netplumb.call("net.vrf.create", {"name": "red", "subnet": "10.9.0.0/24"})
    prepared = await netplumb.call("net.vm.prepare", {"vm": "web", "network": {"vrf": "red", "port_mappings": [
        {"host_interface": "lan0", "host_port": 8080, "vm_port": 80}]}})
    nic = prepared["nics"][0]
    vm = await asyncio.to_thread(vm_nic, lab, node, "web", nic["address"], nic["gateway"])
    await asyncio.to_thread(lab.serve, vm, 80, "web")
    await netplumb.call("net.vm.activate", {"vm": "web"})
    assert await netplumb.call("net.reconcile") == {"changes": [], "failures": []}

    # Lost: the node's table and the VRF's gateway address. Left over: a bridge and a VRF nobody has.
    for argv in (["ip", "netns", "exec", node, "nft", "delete", "table", "inet", "edgevm"],
                 ["ip", "-n", f"{node}-red", "addr", "flush", "dev", "evbr-red"],
                 ["ip", "-n", node, "link", "add", "evh-ghost", "type", "bridge"]):
        await asyncio.to_thread(subprocess.run, argv, check=True)
    assert await asyncio.to_thread(lab.tcp, lan, NODE_LAN, 8080) is None

    repaired = await netplumb.call("net.reconcile")

    assert repaired["failures"] == []
    assert f"{node}: replaced table inet edgevm" in repaired["changes"]
    assert f"{node}-red: added 10.9.0.1/24 to evbr-red" in repaired["changes"]
    assert f"{node}: deleted evh-ghost" in repaired["changes"]
    assert await asyncio.to_thread(lab.tcp, lan, NODE_LAN, 8080) == f"web {LAN_HOST}"
    assert await netplumb.call("net.reconcile") == {"changes": [], "failures": []}
