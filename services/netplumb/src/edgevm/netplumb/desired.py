"""What the kernel of a node must hold, computed from its `edgevm_net` records: a pure function."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface

from edgevm.netplumb import names
from edgevm.netplumb.drivers.values import (
    PortMappingRule,
    VirtualInterfacePlan,
    VirtualIpRule,
    VnetPlan,
    VrfPlan,
    plan_vnet,
    plan_vrf,
)
from edgevm.shared.netstate import VmNetRecord, VnetRecord, VrfRecord

Attachments = dict[tuple[str, str], tuple[IPv4Address, ...]]  # (vnet, vrf) -> virtual IPs on the VRF side


@dataclass(frozen=True)
class Desired:
    """Every VRF, virtual network, rule and wire the node must have; rules only for running VMs."""

    vrfs: tuple[VrfPlan, ...]
    vnets: tuple[VnetPlan, ...]
    attachments: Attachments
    port_mappings: tuple[PortMappingRule, ...]
    virtual_ips: tuple[VirtualIpRule, ...]
    virtual_interfaces: tuple[VirtualInterfacePlan, ...]
    idle_interfaces: tuple[VirtualInterfacePlan, ...]  # of stopped VMs: wired to nothing
    taps: tuple[tuple[str, str], ...] = field(default=())  # (tap, host bridge) of running VMs' bridge NICs

    def vrf(self, name: str) -> VrfPlan:
        """The plan of a VRF by name."""
        return next(vrf for vrf in self.vrfs if vrf.name == name)


def vrf_plan(record: VrfRecord, netns_prefix: str) -> VrfPlan:
    """The kernel plan of a VRF record."""
    return plan_vrf(record.name, record.subnet, uplink=record.uplink, gateway=record.gateway, netns_prefix=netns_prefix)


def vnet_plan(record: VnetRecord, local: IPv4Address | None) -> VnetPlan:
    """The kernel plan of a virtual network record; `local` overrides the recorded underlay address."""
    own = local or IPv4Address(record.local or "0.0.0.0")
    return plan_vnet(record.name, record.cidr, record.vni, own, record.peers)


def nic_address(vm: VmNetRecord) -> IPv4Address | None:
    """The address of the VM's bridge NIC, or None when it has none."""
    return IPv4Interface(vm.nics[0].address).ip if vm.nics and vm.nics[0].address else None


PlanCache = dict[str, tuple[VrfRecord, VrfPlan]]  # by VRF name: the record a plan was made of, and the plan


def vrf_plans(records: list[VrfRecord], netns_prefix: str, cache: PlanCache | None = None) -> tuple[VrfPlan, ...]:
    """The plans of VRF records; with a `cache`, a record seen before (the same object) is not planned again."""
    if cache is None:
        return tuple(vrf_plan(r, netns_prefix) for r in records)
    plans = []
    for record in records:
        known = cache.get(record.name)
        if known is None or known[0] is not record:
            known = cache[record.name] = (record, vrf_plan(record, netns_prefix))
        plans.append(known[1])
    for gone in set(cache) - {record.name for record in records}:
        del cache[gone]
    return tuple(plans)


def desired(
    vrfs: list[VrfRecord],
    vnets: list[VnetRecord],
    vms: list[VmNetRecord],
    netns_prefix: str,
    vxlan_local: IPv4Address | None = None,
    plan_cache: PlanCache | None = None,
) -> Desired:
    """The Desired state of records: VRFs and vnets always, port mappings, virtual IPs and wires of active VMs."""
    planned = vrf_plans(vrfs, netns_prefix, plan_cache)
    known_vrfs = {r.name for r in vrfs}
    known_vnets = {r.name for r in vnets}
    mappings: list[PortMappingRule] = []
    vips: list[VirtualIpRule] = []
    attached: dict[tuple[str, str], list[IPv4Address]] = {}
    wires: list[VirtualInterfacePlan] = []
    idle: list[VirtualInterfacePlan] = []
    taps: list[tuple[str, str]] = []
    for vm in vms:
        passthrough = {nic.name: nic.tap for nic in vm.passthrough_nics}
        plans = [
            VirtualInterfacePlan(vif.name, passthrough[vif.destination])
            for vif in vm.virtual_interfaces
            if vif.destination in passthrough
        ]
        address = nic_address(vm)
        if not vm.active or vm.vrf not in known_vrfs or address is None:
            idle += plans
            continue
        wires += plans
        taps += [(nic.tap, nic.bridge) for nic in vm.nics if nic.bridge]
        for pm in vm.port_mappings:
            mappings.append(PortMappingRule(pm.protocol, pm.host_interface, pm.host_port, address, pm.vm_port, vm.vrf))
        for att in vm.virtual_networks:
            if att.network not in known_vnets:
                continue
            vip = IPv4Address(att.virtual_ip)
            vips.append(VirtualIpRule(address, vip, att.allow_outbound, att.network, vm.vrf))
            attached.setdefault((att.network, vm.vrf), []).append(vip)
    return Desired(
        vrfs=planned,
        vnets=tuple(vnet_plan(r, vxlan_local) for r in vnets),
        attachments={key: tuple(sorted(ips)) for key, ips in sorted(attached.items())},
        port_mappings=tuple(mappings),
        virtual_ips=tuple(vips),
        virtual_interfaces=tuple(wires),
        idle_interfaces=tuple(idle),
        taps=tuple(taps),
    )


def is_default(vrf: str) -> bool:
    """Whether a VRF name is the node namespace's own VRF."""
    return vrf == names.DEFAULT_VRF
