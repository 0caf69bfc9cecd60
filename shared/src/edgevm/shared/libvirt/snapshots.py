"""The snapshots capability: libvirt snapshot metadata and operations of edgevm's domains, as plain values."""

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime

import libvirt

from .connection import HypervisorConnection
from .errors import SnapshotNotFound
from .naming import domain_name

# Snapshots with memory are written and read by QEMU at TCG speed: allow them minutes, not seconds.
SNAPSHOT_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One snapshot as libvirt records it."""

    name: str
    description: str
    created_at: str
    state: str  # libvirt's: running, paused, shutoff, disk-snapshot
    external: bool
    parent: str | None
    current: bool
    xml: str
    overlays: tuple[str, ...] = ()  # the files an external snapshot switched its disks to


def parse_snapshot(xml: str, current: bool) -> SnapshotInfo:
    """A SnapshotInfo from libvirt's snapshot XML."""
    root = ET.fromstring(xml)
    created = int(root.findtext("creationTime") or 0)
    external = root.find("memory[@snapshot='external']") is not None or any(
        disk.get("snapshot") == "external" for disk in root.iterfind("disks/disk")
    )
    return SnapshotInfo(
        name=root.findtext("name") or "",
        description=root.findtext("description") or "",
        created_at=datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        state=root.findtext("state") or "shutoff",
        external=external,
        parent=root.findtext("parent/name"),
        current=current,
        xml=xml,
        overlays=tuple(source.get("file") or "" for source in root.iterfind("disks/disk[@snapshot='external']/source")),
    )


def oldest_first(snapshots: list[SnapshotInfo]) -> list[SnapshotInfo]:
    """Snapshots by creation time; within one second (libvirt's resolution) a parent before its children."""
    parents = {s.name: s.parent for s in snapshots}

    def depth(name: str) -> int:
        seen: set[str] = set()
        while (parent := parents.get(name)) is not None and parent not in seen:
            seen.add(parent)
            name = parent
        return len(seen)

    return sorted(snapshots, key=lambda s: (s.created_at, depth(s.name), s.name))


def snapshot_xml(name: str, description: str, external_disk: tuple[str, str] | None = None,
                 other_disks: tuple[str, ...] = ()) -> str:
    """The XML asking for a snapshot: internal, or external disk-only into the given (target, overlay)."""
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "description").text = description
    if external_disk is not None:
        disks = ET.SubElement(root, "disks")
        target, overlay = external_disk
        disk = ET.SubElement(disks, "disk", name=target, snapshot="external", type="file")
        ET.SubElement(disk, "driver", type="qcow2")
        ET.SubElement(disk, "source", file=overlay)
        for other in other_disks:
            ET.SubElement(disks, "disk", name=other, snapshot="no")
    return ET.tostring(root, encoding="unicode")


def _snapshot(conn: libvirt.virConnect, vm: str, name: str) -> libvirt.virDomainSnapshot:
    return conn.lookupByName(domain_name(vm)).snapshotLookupByName(name)


class Snapshots:
    """The snapshots of edgevm's domains, addressed by VM and snapshot name."""

    def __init__(self, hypervisor: HypervisorConnection) -> None:
        self._hv = hypervisor

    async def list(self, vm: str) -> list[SnapshotInfo]:
        """Every snapshot of the VM, oldest first."""

        def read(conn: libvirt.virConnect) -> list[SnapshotInfo]:
            domain = conn.lookupByName(domain_name(vm))
            found = []
            for snap in domain.listAllSnapshots(0):
                found.append(parse_snapshot(snap.getXMLDesc(0), bool(snap.isCurrent(0))))
            return found

        return oldest_first(await self._hv.call(read))

    async def get(self, vm: str, name: str) -> SnapshotInfo | None:
        """One snapshot, or None."""

        def read(conn: libvirt.virConnect) -> SnapshotInfo:
            snap = _snapshot(conn, vm, name)
            return parse_snapshot(snap.getXMLDesc(0), bool(snap.isCurrent(0)))

        try:
            return await self._hv.call(read)
        except SnapshotNotFound:
            return None

    async def create_internal(self, vm: str, name: str, description: str) -> None:
        """An internal snapshot of every disk, with the memory when the domain runs."""
        xml = snapshot_xml(name, description)
        await self._hv.call(lambda conn: conn.lookupByName(domain_name(vm)).snapshotCreateXML(xml, 0),
                            timeout=SNAPSHOT_TIMEOUT)

    async def create_external(self, vm: str, name: str, description: str, target: str, overlay: str,
                              other_disks: tuple[str, ...]) -> None:
        """An external disk-only snapshot of disk `target` into the existing (prepared) file `overlay`."""
        xml = snapshot_xml(name, description, (target, overlay), other_disks)
        flags = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
        await self._hv.call(lambda conn: conn.lookupByName(domain_name(vm)).snapshotCreateXML(xml, flags),
                            timeout=SNAPSHOT_TIMEOUT)

    async def revert(self, vm: str, name: str) -> None:
        """Revert to an internal snapshot: disks, and memory when it has it (the domain then runs)."""

        def revert(conn: libvirt.virConnect) -> None:
            domain = conn.lookupByName(domain_name(vm))
            snap = domain.snapshotLookupByName(name)
            try:
                domain.revertToSnapshot(snap, 0)
            except libvirt.libvirtError as error:
                # The definition changed since the snapshot (vm.update): libvirt wants the revert forced.
                if error.get_error_code() != libvirt.VIR_ERR_SNAPSHOT_REVERT_RISKY:
                    raise
                domain.revertToSnapshot(snap, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_FORCE)

        await self._hv.call(revert, timeout=SNAPSHOT_TIMEOUT)

    async def delete(self, vm: str, name: str, *, metadata_only: bool = False) -> None:
        """Delete a snapshot (its children get its parent); metadata_only leaves the disks alone."""
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY if metadata_only else 0
        await self._hv.call(lambda conn: _snapshot(conn, vm, name).delete(flags), timeout=SNAPSHOT_TIMEOUT)

    async def make_current(self, vm: str, name: str) -> None:
        """Mark a snapshot as the one the VM runs from, by redefining it with the CURRENT flag."""

        def redefine(conn: libvirt.virConnect) -> None:
            domain = conn.lookupByName(domain_name(vm))
            xml = domain.snapshotLookupByName(name).getXMLDesc(libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE)
            flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
            domain.snapshotCreateXML(xml, flags)

        await self._hv.call(redefine)

