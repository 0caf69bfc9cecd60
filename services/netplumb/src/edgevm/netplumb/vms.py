"""`net.vm.*` (node-internal, asked by lifecycle) and `net.status`: a VM's network through its life.

prepare (before the domain is defined or started) -> activate (it runs) -> deactivate (it stopped)
-> release (it is deleted). Each is idempotent; only activate/deactivate touch the VM's rules.
"""

from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

import msgspec

from edgevm.netplumb import ipam, names
from edgevm.netplumb.checks import PRIMARY_NIC, check_prepare, interfaces_named
from edgevm.netplumb.converge import Outcome, vrf_scope
from edgevm.netplumb.errors import KernelError
from edgevm.netplumb.netconfig import network_config, node_nameservers
from edgevm.netplumb.nodenet import NodeNetwork
from edgevm.shared.clock import now
from edgevm.shared.commands import Empty, NetStatus, NetStatusRequest
from edgevm.shared.errors import NotFound
from edgevm.shared.netstate import (
    NetFailure,
    NetPrepare,
    NetPrepared,
    NetVmRef,
    NicRecord,
    VmNetRecord,
    VrfRecord,
)

log = logging.getLogger(__name__)


def status_of(record: VmNetRecord) -> NetStatus:
    """What net.status reports: addresses always; mappings, virtual networks and interfaces while applied."""
    applied = record.active
    return NetStatus(
        vm=record.vm,
        vrf=record.vrf,
        ip_addresses=[str(IPv4Interface(nic.address).ip) for nic in record.nics if nic.address],
        port_mappings=[msgspec.to_builtins(pm) for pm in record.port_mappings] if applied else [],
        virtual_networks=[msgspec.to_builtins(a) for a in record.virtual_networks] if applied else [],
        virtual_interfaces=[msgspec.to_builtins(v) for v in record.virtual_interfaces] if applied else [],
    )


def detail_of(record: VmNetRecord) -> dict[str, Any]:
    """The `detail` of a net.applied event: the status and whether the VM's rules are in place."""
    detail: dict[str, Any] = msgspec.to_builtins(status_of(record))
    detail["active"] = record.active
    return detail


def concerns(failure: NetFailure, record: VmNetRecord) -> bool:
    """Whether a failed step of a converge is a VM's failure (another VM's broken wire is not)."""
    networks = {a.network for a in record.virtual_networks}
    match failure.step:
        case "tables" | "taps":  # every VM's rules are in the tables; a tap off its bridge may be any VM's
            return True
        case "vrf":
            return failure.vrf == record.vrf
        case "vnet":
            return failure.network in networks
        case "attach" | "detach":
            return failure.vrf == record.vrf and failure.network in networks
        case "vif" | "unwire":  # an interface not unwired still feeds the VM
            return failure.interface in {v.name for v in record.virtual_interfaces}
    return False  # removing unused links is no VM's


def failures_of(outcome: Outcome, record: VmNetRecord) -> list[NetFailure]:
    """The failed steps of a converge that concern a VM."""
    return [failure for failure in outcome.failures if concerns(failure, record)]


def failed_detail(failures: list[NetFailure], **detail: Any) -> dict[str, Any]:
    """The `detail` of a net.failed event: the failures in words (`error`) and as they are (`failures`)."""
    return {"error": "; ".join(map(str, failures)), "failures": msgspec.to_builtins(failures), **detail}


class VmNetCommands:
    """Handlers of `net.vm.prepare|activate|deactivate|release` and `net.status`."""

    def __init__(self, net: NodeNetwork) -> None:
        self._net = net
        self._failed: set[str] = set()  # VMs whose last change was reported as net.failed

    async def prepare(self, req: NetPrepare) -> NetPrepared:
        """Checks the VM's network, allocates (or keeps) its NICs, records them; applies when it runs."""
        return await self._net.exclusive(lambda: self._prepare(req))

    async def _prepare(self, req: NetPrepare) -> NetPrepared:
        net = self._net
        named = interfaces_named(req)
        present = await net.kernel(net.plumber.existing_interfaces, named) if named else set()
        vrf = check_prepare(req, net.records, present)
        before = net.records.vms.get(req.vm)
        record = VmNetRecord(
            vm=req.vm,
            vrf=vrf.name,
            netns=vrf.netns,
            nics=[self._bridge_nic(req.vm, vrf, before)],
            port_mappings=list(req.network.port_mappings),
            virtual_networks=list(req.network.virtual_networks),
            virtual_interfaces=list(req.network.virtual_interfaces),
            active=before.active if before is not None else False,
            updated_at=now(),
            passthrough_nics=self._passthrough_nics(req, before),
        )
        unchanged = False
        if before is not None and msgspec.structs.replace(before, updated_at=record.updated_at) == record:
            record, unchanged = before, True  # a repeated prepare writes nothing
        else:
            await net.records.vms.put(req.vm, record)
        # The VRF's bridge must exist before libvirt plugs the tap in; a running VM gets its new rules.
        scope = vrf_scope(record.vrf, before.vrf if before is not None else None)  # a VM may move to another VRF
        failures = failures_of(await net.converge(scope=scope), record)
        if failures:
            if not unchanged:  # a failed prepare leaves things as they were
                if before is None:
                    await net.records.vms.delete(req.vm)
                else:
                    await net.records.vms.put(req.vm, before)
                await net.converge(scope=scope)
            if record.active:
                await self._report_failure(req.vm, failures, active=True)
            raise KernelError("; ".join(map(str, failures)))
        if record.active and not unchanged:
            await self._report_applied(record)
        nics = [*record.nics, *record.passthrough_nics]
        nameservers = await asyncio.to_thread(node_nameservers)  # a file read: off the event loop
        return NetPrepared(nics=nics, network_config=network_config(nics, nameservers))

    def _bridge_nic(self, vm: str, vrf: VrfRecord, before: VmNetRecord | None) -> NicRecord:
        subnet = IPv4Network(vrf.subnet)
        others = [r for r in self._net.records.vms.all() if r.vm != vm]
        kept = before.nics[0] if before is not None and before.nics else None
        if kept is not None and (before is None or before.vrf != vrf.name):
            kept = None
        taken = {IPv4Interface(n.address).ip for r in others if r.vrf == vrf.name for n in r.nics if n.address}
        old = IPv4Interface(kept.address).ip if kept is not None else None
        if old is not None and old not in taken and old in subnet:
            address = old
        else:
            address = ipam.allocate_address(subnet, taken, IPv4Address(vrf.gateway))
        macs = [n.mac for r in others for n in (*r.nics, *r.passthrough_nics)]
        mac = kept.mac if kept is not None else ipam.mac_address(self._net.node, vm, 0, macs)
        return NicRecord(
            index=0,
            mac=mac,
            address=f"{address}/{subnet.prefixlen}",
            gateway=vrf.gateway,
            bridge=names.host_bridge(vrf.name),
            tap=names.vm_tap(vm, 0),
            name=PRIMARY_NIC,
        )

    def _passthrough_nics(self, req: NetPrepare, before: VmNetRecord | None) -> list[NicRecord]:
        kept = {nic.name: nic for nic in before.passthrough_nics} if before is not None else {}
        others = [r for r in self._net.records.vms.all() if r.vm != req.vm]
        macs = [n.mac for r in others for n in (*r.nics, *r.passthrough_nics)]
        nics = []
        for index, vif in enumerate(req.network.virtual_interfaces, start=1):
            old = kept.get(vif.destination)
            mac = old.mac if old is not None else ipam.mac_address(self._net.node, req.vm, index, macs)
            nics.append(
                NicRecord(
                    index=index,
                    mac=mac,
                    address="",
                    gateway="",
                    bridge="",
                    tap=names.vm_tap(req.vm, index),
                    kind="passthrough",
                    name=vif.destination,
                )
            )
        return nics

    async def activate(self, ref: NetVmRef) -> NetStatus:
        """The VM runs: its port mappings, virtual IPs and virtual interfaces are applied."""
        return await self._net.exclusive(lambda: self._set_active(ref.vm, True))

    async def deactivate(self, ref: NetVmRef) -> NetStatus:
        """The VM stopped: its rules are removed (its addresses stay allocated)."""
        return await self._net.exclusive(lambda: self._set_active(ref.vm, False))

    async def _set_active(self, vm: str, active: bool) -> NetStatus:
        """Puts a VM's rules in place (or removes them); net.applied only when that changes something.

        Lifecycle asks for it on every start and stop, and the watch of edgevm_vms on what lifecycle may have
        missed: whichever comes second finds the record as wanted and the kernel converged, so it reports
        nothing new. A VM whose last change failed is reported again once a change works.
        """
        net = self._net
        record = net.records.vms.get(vm)
        if record is None:
            if active:
                raise NotFound(f"VM {vm} has no network on this node: net.vm.prepare it first", "vm")
            return NetStatus(vm, "", [], [], [], [])
        changed = record.active != active or vm in self._failed
        if record.active != active:
            record = msgspec.structs.replace(record, active=active, updated_at=now())
            await net.records.vms.put(vm, record)
        failures = failures_of(await net.converge(scope=vrf_scope(record.vrf)), record)
        if failures:
            await self._report_failure(vm, failures, active=active)
            raise KernelError("; ".join(map(str, failures)))
        if changed:
            await self._report_applied(record)
        return status_of(record)

    async def _report_applied(self, record: VmNetRecord) -> None:
        self._failed.discard(record.vm)
        await self._net.published(record.vm, detail_of(record))

    async def _report_failure(self, vm: str, failures: list[NetFailure], *, active: bool) -> None:
        self._failed.add(vm)
        await self._net.published(vm, failed_detail(failures, active=active), failed=True)

    async def release(self, ref: NetVmRef) -> Empty:
        """The VM is deleted: its rules go, its addresses and MACs are free again, its record is removed.

        When the rules of a running VM cannot be removed, nothing is freed and the reply is 503.
        """
        return await self._net.exclusive(lambda: self._release(ref.vm))

    async def _release(self, vm: str) -> Empty:
        net = self._net
        record = net.records.vms.get(vm)
        if record is None:
            return Empty()
        if record.active:
            # The rules of a VM deleted while it runs go first: its address is freed (and may be given to the
            # next VM) only once no port mapping or virtual IP leads to it any more.
            await self._set_active(vm, False)
        await net.records.vms.delete(vm)
        self._failed.discard(vm)
        outcome = await net.converge(scope=vrf_scope(record.vrf))
        if outcome.failures:
            await net.published(vm, failed_detail(outcome.failures, released=True), failed=True)
        return Empty()

    async def status(self, req: NetStatusRequest) -> NetStatus:
        """net.status: the VM's network as applied on the node."""
        record = self._net.records.vms.get(req.vm)
        if record is None:
            raise NotFound(f"VM {req.vm} has no network on this node", "vm")
        return status_of(record)
