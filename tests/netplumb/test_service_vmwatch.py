"""Self-healing from lifecycle's `edgevm_vms`: a VM that stops or goes away by itself loses its rules."""

import asyncio

import msgspec
import pytest
from tests.helpers import eventually

from conftest import start_netplumb
from edgevm.shared.bus import VMS
from edgevm.shared.clock import now
from edgevm.shared.errors import RemoteError
from edgevm.shared.objects import Vm, VmStatus
from edgevm.shared.spec import VmSpec

pytestmark = pytest.mark.root


async def test_vm_states_in_edgevm_vms_activate_deactivate_and_release(lab, node, netplumb, nc):
    await asyncio.to_thread(lab.wire, node, "lan", "lan0")
    await netplumb.call("net.vm.prepare", {"vm": "web", "network": {
        "port_mappings": [{"host_interface": "lan0", "host_port": 8080, "vm_port": 80}]}})
    kv = await nc.jetstream().key_value(VMS.name)
    key = f"{netplumb.node}.web"

    async def state(value):
        vm = Vm(VmSpec(name="web", image="img"), VmStatus(value, 1, now(), now()))
        await kv.put(key, msgspec.json.encode(vm))

    async def mapped():
        return (await netplumb.call("net.status", {"vm": "web"}))["port_mappings"]

    await state("running")
    await eventually(mapped, what="activated by a running VM")
    await state("stopped")
    await eventually(lambda: _not(mapped), what="deactivated by a stopped VM")
    await kv.delete(key)
    await eventually(lambda: _gone(netplumb), what="released by a deleted VM")


async def _not(check):
    return not await check()


async def _gone(netplumb):
    try:
        await netplumb.call("net.status", {"vm": "web"})
    except RemoteError as exc:
        return exc.code == "404"
    return False


async def test_a_deleted_vm_key_does_not_release_the_network_of_a_vm_created_again_since(
        lab, node, netplumb, nats_server, nc, tmp_path):
    """Delete `web`, create it again: the old deletion, replayed to a restarted netplumb, keeps the new network."""
    await asyncio.to_thread(lab.wire, node, "lan", "lan0")
    kv = await nc.jetstream().key_value(VMS.name)

    async def state(vm, value):
        record = Vm(VmSpec(name=vm, image="img"), VmStatus(value, 1, now(), now()))
        await kv.put(f"{netplumb.node}.{vm}", msgspec.json.encode(record))

    await state("web", "stopped")
    await kv.delete(f"{netplumb.node}.web")  # the old `web` is gone
    await asyncio.sleep(0.01)
    prepared = await netplumb.call("net.vm.prepare", {"vm": "web", "network": {}})  # the new `web`
    await netplumb.call("net.vm.prepare", {"vm": "probe", "network": {
        "port_mappings": [{"host_interface": "lan0", "host_port": 8080, "vm_port": 80}]}})
    await netplumb.shutdown()

    again = await start_netplumb(nats_server.url, nc, node, tmp_path, node=netplumb.node)
    try:
        # Entries are followed in order: once `probe` (written last) is active, web's deletion was seen.
        await state("probe", "running")
        await eventually(lambda: _mapped(again, "probe"), what="probe activated")
        status = await again.call("net.status", {"vm": "web"})
        assert status["ip_addresses"] == [prepared["nics"][0]["address"].split("/")[0]]
    finally:
        await again.shutdown()


async def _mapped(service, vm):
    return (await service.call("net.status", {"vm": vm}))["port_mappings"]
