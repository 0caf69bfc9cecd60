"""`net.vnet.*`: the virtual networks (VXLAN overlays) this node takes part in."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from edgevm.netplumb.converge import vrf_scope
from edgevm.netplumb.desired import vnet_plan
from edgevm.netplumb.nodenet import NodeNetwork
from edgevm.netplumb.vrfs import check_usable
from edgevm.shared.clock import now
from edgevm.shared.commands import Empty, NameRef, VnetCreate, VnetList
from edgevm.shared.errors import Conflict, NotFound, Unprocessable
from edgevm.shared.netstate import VnetRecord
from edgevm.shared.objects import Vnet


def public(record: VnetRecord) -> Vnet:
    """The protocol's Vnet of a record."""
    return Vnet(name=record.name, cidr=record.cidr, vni=record.vni, peers=list(record.peers))


class VnetCommands:
    """Handlers of `net.vnet.*`."""

    def __init__(self, net: NodeNetwork) -> None:
        self._net = net

    async def create(self, cmd: VnetCreate) -> Vnet:
        """net.vnet.create: the network's bridge and VXLAN device, flooding to its peers."""
        return await self._net.exclusive(lambda: self._create(cmd))

    async def _create(self, cmd: VnetCreate) -> Vnet:
        records = self._net.records.vnets
        if cmd.name in records:
            raise Conflict(f"a virtual network named {cmd.name} exists already", "name")
        check_usable("cidr", IPv4Network(cmd.cidr), self._net)
        for other in records.all():
            if other.vni == cmd.vni:
                raise Conflict(f"VXLAN id {cmd.vni} is used by virtual network {other.name}", "vni")
        local: IPv4Address | None = self._net.settings.vxlan_local
        if local is None:
            local = await self._net.kernel(self._net.plumber.underlay_address, cmd.peers)
        if local is None:
            raise Unprocessable(
                "the node has no underlay address to send VXLAN from: give peers it can route to, "
                "or set EDGEVM_VXLAN_LOCAL",
                "peers",
            )
        peers = sorted({p for p in cmd.peers if IPv4Address(p) != local}, key=IPv4Address)
        record = VnetRecord(name=cmd.name, cidr=cmd.cidr, vni=cmd.vni, peers=peers, created_at=now(), local=str(local))
        await records.put(cmd.name, record)
        try:
            # A new network has no VM yet: the node's own parts only.
            await self._net.converge_or_raise(lambda f: f.step == "vnet" and f.network == cmd.name, vrf_scope())
        except Exception:
            await self._net.kernel(self._net.plumber.remove_vnet, vnet_plan(record, self._net.settings.vxlan_local))
            await records.delete(cmd.name)
            await self._net.converge(scope=vrf_scope())
            raise
        return public(record)

    async def list(self, _: Empty) -> VnetList:
        """net.vnet.list."""
        return VnetList(vnets=[public(r) for r in self._net.records.vnets.all()])

    async def delete(self, cmd: NameRef) -> Empty:
        """net.vnet.delete: 409 while a VM is attached to it."""
        return await self._net.exclusive(lambda: self._delete(cmd))

    async def _delete(self, cmd: NameRef) -> Empty:
        record = self._net.records.vnets.get(cmd.name)
        if record is None:
            raise NotFound(f"virtual network {cmd.name} does not exist", "name")
        users = [
            vm.vm for vm in self._net.records.vms.all() if any(a.network == cmd.name for a in vm.virtual_networks)
        ]
        if users:
            raise Conflict(f"virtual network {cmd.name} is used by VM(s) {', '.join(users)}", "name")
        await self._net.kernel(self._net.plumber.remove_vnet, vnet_plan(record, self._net.settings.vxlan_local))
        await self._net.records.vnets.delete(cmd.name)
        await self._net.converge(scope=vrf_scope())  # no VM is attached to it: nothing in any VRF changes
        return Empty()
