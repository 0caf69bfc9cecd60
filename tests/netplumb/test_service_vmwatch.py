"""Self-healing from lifecycle's `edgevm_vms`: a VM that stops or goes away by itself loses its rules."""

import asyncio

import msgspec
import pytest
from tests.helpers import eventually

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
