"""`net.vrf.*`: create, list and delete the node's VRFs; the default VRF exists from start-up on."""

from __future__ import annotations

import logging
from ipaddress import IPv4Network

from edgevm.netplumb import ipam, names
from edgevm.netplumb.converge import vrf_scope
from edgevm.netplumb.desired import vrf_plan
from edgevm.netplumb.nodenet import NodeNetwork
from edgevm.shared.clock import now
from edgevm.shared.commands import Empty, NameRef, VrfCreate, VrfList
from edgevm.shared.errors import Conflict, InvalidRequest, NotFound, Unprocessable
from edgevm.shared.netstate import VrfRecord
from edgevm.shared.objects import Vrf

log = logging.getLogger(__name__)


def node_ranges(node: NodeNetwork) -> list[tuple[IPv4Network, str]]:
    """The node's own networks, which no other VRF or virtual network may overlap: its default VRF's subnet."""
    default = node.records.vrfs.get(names.DEFAULT_VRF)
    subnets = {node.settings.default_subnet, *([IPv4Network(default.subnet)] if default is not None else [])}
    return [(subnet, f"the node's default VRF {subnet}") for subnet in sorted(subnets)]


def check_usable(field: str, net: IPv4Network, node: NodeNetwork) -> None:
    """Raise a 400 naming `field` when `net` cannot be a network of VMs on this node."""
    reason = ipam.unusable_because(net, node_ranges(node))
    if reason is not None:
        raise InvalidRequest(f"{field}: {net} {reason}", field)


def public(record: VrfRecord) -> Vrf:
    """The protocol's Vrf of a record."""
    return Vrf(name=record.name, subnet=record.subnet, gateway=record.gateway)


class VrfCommands:
    """Handlers of `net.vrf.*`."""

    def __init__(self, net: NodeNetwork) -> None:
        self._net = net

    async def ensure_default(self) -> None:
        """Records the default VRF (in the node namespace, subnet from the settings) when there is none."""
        records = self._net.records.vrfs
        subnet = self._net.settings.default_subnet
        current = records.get(names.DEFAULT_VRF)
        if current is None:
            gateway = str(ipam.gateway_address(subnet))
            record = VrfRecord(
                name=names.DEFAULT_VRF, subnet=str(subnet), gateway=gateway, netns=None, created_at=now()
            )
            await records.put(names.DEFAULT_VRF, record)
        elif current.subnet != str(subnet):
            log.warning("the default VRF keeps its subnet %s (EDGEVM_DEFAULT_SUBNET says %s)", current.subnet, subnet)

    async def create(self, cmd: VrfCreate) -> Vrf:
        """net.vrf.create: a namespace with a bridge holding the gateway, joined to the node by an uplink."""
        return await self._net.exclusive(lambda: self._create(cmd))

    async def _create(self, cmd: VrfCreate) -> Vrf:
        records = self._net.records.vrfs
        if cmd.name in records:
            raise Conflict(f"a VRF named {cmd.name} exists already", "name")
        limit = self._net.settings.max_vrfs
        if len(records) - (names.DEFAULT_VRF in records) >= limit:
            raise Unprocessable(
                f"name: this node holds {limit} VRFs besides default, its maximum; delete one first", "name"
            )
        subnet = IPv4Network(cmd.subnet)
        check_usable("subnet", subnet, self._net)
        taken = [IPv4Network(r.uplink) for r in records.all() if r.uplink]
        uplink = ipam.allocate_uplink(ipam.DEFAULT_UPLINK_POOL, taken)
        record = VrfRecord(
            name=cmd.name,
            subnet=str(subnet),
            gateway=str(ipam.gateway_address(subnet)),
            netns=names.vrf_netns(cmd.name, self._net.settings.netns_prefix),
            uplink=str(uplink),
            created_at=now(),
        )
        await records.put(cmd.name, record)
        scope = vrf_scope(cmd.name)  # the new VRF and the node's table: no other VRF changes
        try:
            await self._net.converge_or_raise(
                lambda f: f.step == "tables" or (f.step == "vrf" and f.vrf == cmd.name), scope
            )
        except Exception:
            await self._net.kernel(self._net.plumber.remove_vrf, vrf_plan(record, self._net.settings.netns_prefix))
            await records.delete(cmd.name)
            await self._net.converge(scope=scope)
            raise
        return public(record)

    async def list(self, _: Empty) -> VrfList:
        """net.vrf.list."""
        return VrfList(vrfs=[public(r) for r in self._net.records.vrfs.all()])

    async def delete(self, cmd: NameRef) -> Empty:
        """net.vrf.delete: 409 while a VM is in it; the default VRF is never deleted."""
        return await self._net.exclusive(lambda: self._delete(cmd))

    async def _delete(self, cmd: NameRef) -> Empty:
        record = self._net.records.vrfs.get(cmd.name)
        if record is None:
            raise NotFound(f"VRF {cmd.name} does not exist", "name")
        if cmd.name == names.DEFAULT_VRF:
            raise Conflict("the default VRF is the node's own network and cannot be deleted", "name")
        users = [vm.vm for vm in self._net.records.vms.all() if vm.vrf == cmd.name]
        if users:
            raise Conflict(f"VRF {cmd.name} is used by VM(s) {', '.join(users)}", "name")
        await self._net.kernel(self._net.plumber.remove_vrf, vrf_plan(record, self._net.settings.netns_prefix))
        await self._net.records.vrfs.delete(cmd.name)
        await self._net.converge(scope=vrf_scope())  # the node's table: no other VRF changes
        return Empty()
