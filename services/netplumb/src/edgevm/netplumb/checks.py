"""The semantic checks of `net.vm.prepare`: a VM's network against the node's records and interfaces.

Each failure names the field of the VmSpec it is about (`network.port_mappings[1].host_port`), so
lifecycle can hand the error to the user of `vm.create` / `vm.update` as it is.
"""

from __future__ import annotations

from collections.abc import Set
from ipaddress import IPv4Address, IPv4Network

from edgevm.netplumb import names
from edgevm.netplumb.records import NetRecords
from edgevm.shared.errors import Conflict, InvalidRequest, NotFound
from edgevm.shared.netstate import NetPrepare, VmNetRecord, VrfRecord

PRIMARY_NIC = "eth0"


def interfaces_named(req: NetPrepare) -> set[str]:
    """The host interfaces a VM's network names (port mappings and virtual interfaces)."""
    network = req.network
    return {pm.host_interface for pm in network.port_mappings} | {vif.name for vif in network.virtual_interfaces}


def check_prepare(req: NetPrepare, records: NetRecords, interfaces: Set[str]) -> VrfRecord:
    """Raises the first broken rule (400/404/409 naming the field); returns the VM's VRF."""
    network = req.network
    vrf = records.vrfs.get(network.vrf)
    if vrf is None:
        raise NotFound(f"network.vrf: VRF {network.vrf} does not exist on this node", "network.vrf")
    others = [vm for vm in records.vms.all() if vm.vm != req.vm]
    _check_port_mappings(req, vrf, interfaces, others)
    _check_virtual_networks(req, records, others)
    _check_virtual_interfaces(req, interfaces, others)
    return vrf


def _check_port_mappings(req: NetPrepare, vrf: VrfRecord, interfaces: Set[str], others: list[VmNetRecord]) -> None:
    on_node: dict[tuple[str, str, int], str] = {}
    in_vrf: dict[tuple[str, str, int], tuple[str, str]] = {}
    for vm in others:
        for pm in vm.port_mappings:
            for proto in pm.protocols():
                on_node[(proto, pm.host_interface, pm.host_port)] = vm.vm
                in_vrf[(vm.vrf, proto, pm.host_port)] = (vm.vm, pm.host_interface)
    for i, pm in enumerate(req.network.port_mappings):
        field = f"network.port_mappings[{i}]"
        if pm.host_interface not in interfaces:
            raise InvalidRequest(
                f"{field}.host_interface: the node has no interface {pm.host_interface}", f"{field}.host_interface"
            )
        for proto in pm.protocols():
            holder = on_node.get((proto, pm.host_interface, pm.host_port))
            if holder is not None:
                raise Conflict(
                    f"{field}.host_port: {proto} {pm.host_interface}:{pm.host_port} is mapped to VM {holder}",
                    f"{field}.host_port",
                )
            # Inside a VRF namespace only the port tells mappings apart: the node DNATs to one uplink address.
            other = in_vrf.get((vrf.name, proto, pm.host_port))
            if vrf.name != names.DEFAULT_VRF and other is not None and other[1] != pm.host_interface:
                raise Conflict(
                    f"{field}.host_port: {proto} port {pm.host_port} is mapped on {other[1]} for VM {other[0]} of "
                    f"VRF {vrf.name}; a VRF uses a host port on one interface only",
                    f"{field}.host_port",
                )
            on_node[(proto, pm.host_interface, pm.host_port)] = req.vm
            in_vrf[(vrf.name, proto, pm.host_port)] = (req.vm, pm.host_interface)


def _check_virtual_networks(req: NetPrepare, records: NetRecords, others: list[VmNetRecord]) -> None:
    taken = {(a.network, a.virtual_ip): vm.vm for vm in others for a in vm.virtual_networks}
    for i, att in enumerate(req.network.virtual_networks):
        field = f"network.virtual_networks[{i}]"
        vnet = records.vnets.get(att.network)
        if vnet is None:
            raise NotFound(f"{field}.network: virtual network {att.network} does not exist", f"{field}.network")
        cidr, ip = IPv4Network(vnet.cidr), IPv4Address(att.virtual_ip)
        if ip not in cidr:
            raise InvalidRequest(
                f"{field}.virtual_ip: {ip} is outside virtual network {vnet.name} ({cidr})", f"{field}.virtual_ip"
            )
        if cidr.prefixlen < 31 and ip in (cidr.network_address, cidr.broadcast_address):
            raise InvalidRequest(
                f"{field}.virtual_ip: {ip} is the network or broadcast address of {cidr}", f"{field}.virtual_ip"
            )
        holder = taken.get((att.network, att.virtual_ip))
        if holder is not None:
            raise Conflict(f"{field}.virtual_ip: {ip} is the virtual IP of VM {holder}", f"{field}.virtual_ip")


def _check_virtual_interfaces(req: NetPrepare, interfaces: Set[str], others: list[VmNetRecord]) -> None:
    taken = {vif.name: vm.vm for vm in others for vif in vm.virtual_interfaces}
    mapped = {pm.host_interface for pm in req.network.port_mappings}
    destinations: set[str] = set()
    for i, vif in enumerate(req.network.virtual_interfaces):
        field = f"network.virtual_interfaces[{i}]"
        if vif.name not in interfaces:
            raise InvalidRequest(f"{field}.name: the node has no interface {vif.name}", f"{field}.name")
        if vif.name.startswith("ev"):
            raise InvalidRequest(f"{field}.name: {vif.name} is one of edgevm's own interfaces", f"{field}.name")
        if vif.name in taken:
            raise Conflict(f"{field}.name: {vif.name} is forwarded to VM {taken[vif.name]}", f"{field}.name")
        if vif.name in mapped:
            raise InvalidRequest(
                f"{field}.name: {vif.name} also carries port mappings of this VM; its traffic can go one way only",
                f"{field}.name",
            )
        if vif.destination == PRIMARY_NIC:
            raise InvalidRequest(
                f"{field}.destination: {PRIMARY_NIC} is the VM's NIC in its VRF; name another NIC (e.g. eth1)",
                f"{field}.destination",
            )
        if vif.destination in destinations:
            raise InvalidRequest(f"{field}.destination: NIC {vif.destination} is used twice", f"{field}.destination")
        destinations.add(vif.destination)
