"""edgevm's domains as the snapshotter sees them: the VM's root disk in the definition and the live chain,
over the shared libvirt capabilities (power, definitions, block jobs)."""

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from edgevm.shared.layout import ROOT_DISK, SNAPSHOTS
from edgevm.shared.libvirt.blockjobs import BlockJobs
from edgevm.shared.libvirt.connection import HypervisorConnection
from edgevm.shared.libvirt.definitions import Definitions
from edgevm.shared.libvirt.errors import OperationInvalid
from edgevm.shared.libvirt.power import Power


@dataclass(frozen=True, slots=True)
class RootDisk:
    """The VM's own boot disk in the domain's persistent definition: its target and its source file."""

    target: str
    source: str


def find_root_disk(domain_xml: str, vm_dir: Path) -> RootDisk | None:
    """The first file disk whose source is `<vm_dir>/root.qcow2` or a file in `<vm_dir>/snapshots/`.

    Directories are compared by their real path: the definition may name the VM's directory through a
    symbolic link (the lifecycle's EDGEVM_STATE_DIR as given) or by its real path (written here).
    """
    home = os.path.realpath(vm_dir)
    layers = os.path.join(home, SNAPSHOTS)
    for disk in ET.fromstring(domain_xml).iterfind("devices/disk"):
        source, target = disk.find("source"), disk.find("target")
        if disk.get("device", "disk") != "disk" or source is None or target is None:
            continue
        path = source.get("file") or ""
        if not os.path.isabs(path):
            continue
        folder, base = os.path.split(path)
        where = os.path.realpath(folder)
        if (where == home and base == ROOT_DISK) or where == layers:
            return RootDisk(target.get("dev") or "", path)
    return None


def with_root_source(domain_xml: str, target: str, path: str) -> str:
    """The domain XML with disk `target` reading `path`, its backing chain left for libvirt to probe."""
    root = ET.fromstring(domain_xml)
    for disk in root.iterfind("devices/disk"):
        found = disk.find("target")
        if found is not None and found.get("dev") == target:
            source = disk.find("source")
            if source is None:
                raise OperationInvalid(f"disk {target} of the domain has no source to point at {path}")
            source.set("file", path)
            # libvirt honours a backingStore in the definition instead of reading the chain from the
            # image headers: after a snapshot it records the old top by the path it was opened with.
            for backing in disk.findall("backingStore"):
                disk.remove(backing)
    return ET.tostring(root, encoding="unicode")


def disk_source(domain_xml: str, target: str) -> str | None:
    """The source file of disk `target` in a domain XML."""
    for disk in ET.fromstring(domain_xml).iterfind("devices/disk"):
        found, source = disk.find("target"), disk.find("source")
        if found is not None and found.get("dev") == target and source is not None:
            return source.get("file")
    return None


def chain_index(live_xml: str, target: str, depth: int) -> str | None:
    """libvirt's name (`vda[3]`) of the image `depth` levels below the top of disk `target`'s live chain."""
    for disk in ET.fromstring(live_xml).iterfind("devices/disk"):
        found = disk.find("target")
        if found is None or found.get("dev") != target:
            continue
        element = disk
        for _ in range(depth):
            backing = element.find("backingStore")
            if backing is None or backing.find("source") is None:
                return None
            element = backing
        index = element.get("index")
        return f"{target}[{index}]" if index else None
    return None


class Domains:
    """The domains of edgevm's VMs as snapshots need them, addressed by VM name."""

    def __init__(self, hypervisor: HypervisorConnection) -> None:
        self.power = Power(hypervisor)
        self.definitions = Definitions(hypervisor)
        self.blocks = BlockJobs(hypervisor)

    async def is_running(self, vm: str) -> bool:
        """Whether the domain runs (paused counts as running: it has a live QEMU)."""
        return await self.power.is_running(vm)

    async def xml(self, vm: str, *, inactive: bool = False) -> str:
        """The live XML, or with inactive=True the persistent definition."""
        return await self.definitions.xml(vm, inactive=inactive)

    async def define(self, xml: str) -> None:
        """Redefine a domain (same name and UUID) from its XML."""
        await self.definitions.define_xml(xml)

    async def root_disk(self, vm: str, vm_dir: Path) -> RootDisk | None:
        """The VM's own boot disk in its persistent definition, or None (e.g. it boots from an ISO)."""
        return find_root_disk(await self.xml(vm, inactive=True), vm_dir)

    async def live_source(self, vm: str, target: str) -> str | None:
        """The file the running QEMU writes disk `target` to (None when the domain is off)."""
        if not await self.is_running(vm):
            return None
        return disk_source(await self.xml(vm), target)

    async def set_root_source(self, vm: str, target: str, path: str) -> None:
        """Point the persistent definition's disk `target` at `path`."""
        await self.define(with_root_source(await self.xml(vm, inactive=True), target, path))

    async def destroy(self, vm: str, timeout: float = 30) -> None:
        """Power the domain off at once and wait until it is off."""
        await self.power.power_off(vm, timeout)

    async def start(self, vm: str, timeout: float = 60) -> None:
        """Start the domain and wait until it runs."""
        await self.power.power_on(vm, timeout)

    async def wait_idle(self, vm: str, timeout: float = 600) -> None:
        """Wait until no job runs on the domain (a snapshot libvirtd still takes for a dead caller)."""
        await self.blocks.wait_idle(vm, timeout)

    async def live_index(self, vm: str, target: str, depth: int) -> str | None:
        """libvirt's name of the image `depth` levels below the top of the live chain of disk `target`."""
        return chain_index(await self.xml(vm), target, depth)

    async def block_pull(self, vm: str, target: str, base: str | None, timeout: float = 600) -> None:
        """Pull the data above `base` into the active image of `target` (online) and wait for the job."""
        await self.blocks.pull(vm, target, base, timeout)

    async def wait_block_job(self, vm: str, target: str, timeout: float = 600) -> None:
        """Wait until disk `target` has no block job."""
        await self.blocks.wait_job(vm, target, timeout)
