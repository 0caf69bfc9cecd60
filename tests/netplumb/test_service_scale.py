"""Netplumb at hundreds of VRFs: a VM's change touches its own VRF's namespace and the node's, however many
VRFs the node holds; a reconcile goes in parts and lets commands through; the VRF count has a maximum.

Work is compared, not time: `edgevm_netplumb_converge_namespaces` counts the namespaces each converge read or
changed. The only clock is lifecycle's own deadline for net.vm.prepare, used as the call's timeout.
"""

import asyncio
import os

import pytest
from prometheus_client import REGISTRY
from tests.helpers import eventually

from conftest import start_netplumb
from edgevm.lifecycle.network import PREPARE_TIMEOUT
from edgevm.netplumb.drivers import netns as ns
from edgevm.netplumb.reconcile import VRFS_PER_PART

pytestmark = pytest.mark.root

MANY = 200  # VRFs besides default: about 20 s to build here (each ~70 ms of namespace, veths and a table)


def converges(kind: str) -> tuple[float, float]:
    """(converges, namespaces touched) of a kind so far, in this process."""
    count = REGISTRY.get_sample_value("edgevm_netplumb_converge_namespaces_count", {"kind": kind}) or 0.0
    total = REGISTRY.get_sample_value("edgevm_netplumb_converge_namespaces_sum", {"kind": kind}) or 0.0
    return count, total


async def namespaces_per_change(netplumb, verb: str, request: dict, timeout: float = 15) -> float:
    """Namespaces touched by the converges of one command (and that it made exactly one)."""
    before = converges("change")
    await asyncio.wait_for(netplumb.call(verb, request), timeout)
    after = converges("change")
    assert after[0] - before[0] == 1, f"{verb} converged {after[0] - before[0]} times"
    return after[1] - before[1]


async def vm_change_costs(netplumb, vm: str, vrf: str) -> list[float]:
    """Namespaces touched by a VM's prepare, activate, deactivate and release, in that order."""
    network = {"vrf": vrf, "port_mappings": [{"host_interface": "evm0", "host_port": 8080, "vm_port": 80}]}
    return [
        # lifecycle waits PREPARE_TIMEOUT for this answer (vm.create's 2 s deadline)
        await namespaces_per_change(netplumb, "net.vm.prepare", {"vm": vm, "network": network}, PREPARE_TIMEOUT),
        await namespaces_per_change(netplumb, "net.vm.activate", {"vm": vm}),
        await namespaces_per_change(netplumb, "net.vm.deactivate", {"vm": vm}),
        await namespaces_per_change(netplumb, "net.vm.release", {"vm": vm}),
    ]


async def create_vrfs(netplumb, first: int, last: int) -> list[float]:
    """Creates VRFs v<first>..v<last-1>; the namespaces each create touched."""
    return [
        await namespaces_per_change(netplumb, "net.vrf.create", {"name": f"v{n}", "subnet": "10.5.0.0/24"})
        for n in range(first, last)
    ]


async def test_a_vm_change_touches_the_same_namespaces_at_2_and_at_200_vrfs(lab, node, netplumb):
    await asyncio.to_thread(lab.wire, node, "lan", "evm0")  # the host interface the port mapping names
    small = await create_vrfs(netplumb, 0, 2)
    at_two = await vm_change_costs(netplumb, "few", "v1")
    many = await create_vrfs(netplumb, 2, MANY)
    at_many = await vm_change_costs(netplumb, "many", f"v{MANY - 1}")

    assert at_two == at_many == [2, 2, 2, 2], "each: the VRF's namespace and the node's, nothing else"
    assert small[-1] == many[-1] == 2, "a VRF create: the new VRF's namespace and the node's"
    assert await namespaces_per_change(netplumb, "net.vrf.delete", {"name": "v0"}) == 1, "only the node's"
    assert len((await netplumb.call("net.vrf.list"))["vrfs"]) == MANY  # default and v1..v199


async def test_a_reconcile_of_many_vrfs_goes_in_parts_and_a_prepare_answers_between_them(lab, node, netplumb):
    await create_vrfs(netplumb, 0, MANY)
    parts_before, _ = converges("reconcile")
    reconcile = asyncio.create_task(netplumb.call("net.reconcile"))

    async def first_part_done() -> bool:  # the node's own part
        return converges("reconcile")[0] > parts_before

    await eventually(first_part_done, 30, "the reconcile's first part")
    prepared = await netplumb.call("net.vm.prepare", {"vm": "early", "network": {"vrf": f"v{MANY - 1}"}})

    assert not reconcile.done(), "the prepare was answered while the reconcile still had VRFs to check"
    assert (await reconcile) == {"changes": [], "failures": []}
    assert prepared["nics"][0]["address"] == "10.5.0.2/24"
    parts = converges("reconcile")[0] - parts_before
    assert parts == -(-MANY // VRFS_PER_PART), "the node's part with the first VRFs, then the rest a part at a time"


async def test_a_vrf_past_the_maximum_is_a_422_naming_name_and_changes_nothing(lab, node, nats_server, nc,
                                                                                tmp_path):
    service = await start_netplumb(nats_server.url, nc, node, tmp_path, max_vrfs=3)
    try:
        for n in range(3):
            await service.call("net.vrf.create", {"name": f"v{n}", "subnet": "10.5.0.0/24"})
        before = await service.call("net.vrf.list")
        error = await service.error("net.vrf.create", {"name": "v3", "subnet": "10.6.0.0/24"})
        assert (error.code, error.field) == ("422", "name")
        assert "3 VRFs besides default, its maximum" in error.message
        assert await service.call("net.vrf.list") == before
        assert not ns.exists(f"{node}-v3")
        assert sorted(n for n in os.listdir(ns.NETNS_DIR) if n.startswith(f"{node}-")) == [
            f"{node}-v{n}" for n in range(3)
        ]
        await service.call("net.vrf.delete", {"name": "v0"})
        await service.call("net.vrf.create", {"name": "v3", "subnet": "10.6.0.0/24"})  # room again
    finally:
        await service.shutdown()
