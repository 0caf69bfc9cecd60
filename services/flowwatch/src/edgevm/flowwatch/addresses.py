"""The address map: which VM owns an address in which namespace, from netplumb's `edgevm_net` records."""

from __future__ import annotations

from collections.abc import Iterable

from edgevm.shared.netstate import VmNetRecord, VrfRecord

__all__ = ["AddressMap"]

Netns = str | None  # a namespace as netplumb names it; None is the node's own


class AddressMap:
    """VM addresses keyed by namespace, so equal addresses in two VRFs never mix.

    A VM owns its NIC addresses and its virtual IPs, in the namespace its record names. Host port
    mappings need no entry: conntrack's reply tuple carries the VM's own address after the DNAT.
    """

    def __init__(self) -> None:
        self._vms: dict[str, VmNetRecord] = {}
        self._vrf_netns: dict[str, Netns] = {}
        self._by_netns: dict[Netns, dict[str, str]] = {}

    def put_vm(self, record: VmNetRecord) -> set[Netns]:
        """Add or replace a VM's record; return the namespaces whose addresses changed."""
        old = self._vms.get(record.vm)
        self._vms[record.vm] = record
        touched = {record.netns} if old is None else {old.netns, record.netns}
        self._rebuild(touched)
        return touched

    def remove_vm(self, vm: str) -> set[Netns]:
        """Forget a VM; return the namespaces whose addresses changed."""
        old = self._vms.pop(vm, None)
        if old is None:
            return set()
        self._rebuild({old.netns})
        return {old.netns}

    def put_vrf(self, record: VrfRecord) -> None:
        """Remember a VRF's namespace, to watch it even before a VM lives there."""
        self._vrf_netns[record.name] = record.netns

    def remove_vrf(self, name: str) -> None:
        """Forget a VRF."""
        self._vrf_netns.pop(name, None)

    def addresses(self, netns: Netns) -> dict[str, str]:
        """The live address -> VM table of a namespace (the same dict object until the namespace empties)."""
        table = self._by_netns.get(netns)
        if table is None:
            table = self._by_netns[netns] = {}
        return table

    def namespaces(self) -> set[Netns]:
        """Every namespace to watch: the node's own, each VRF's and each VM's."""
        return {None, *self._vrf_netns.values(), *(r.netns for r in self._vms.values())}

    def knows(self, vm: str) -> bool:
        """True if netplumb has a record of this VM."""
        return vm in self._vms

    def netns_of(self, vm: str) -> Netns:
        """The namespace of a known VM."""
        return self._vms[vm].netns

    def _rebuild(self, touched: Iterable[Netns]) -> None:
        for netns in touched:
            fresh: dict[str, str] = {}
            for record in sorted(self._vms.values(), key=lambda r: r.vm):
                if record.netns != netns:
                    continue
                for nic in record.nics:
                    fresh.setdefault(nic.address.split("/", 1)[0], record.vm)
                for vnet in record.virtual_networks:
                    fresh.setdefault(vnet.virtual_ip, record.vm)
            # updated in place: tables that hold it see the change at once
            table = self.addresses(netns)
            table.clear()
            table.update(fresh)
