"""From a VmSpec to the files a VM needs and the DomainPlan libvirt gets."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from edgevm.lifecycle.seed import SeedContent
from edgevm.shared.layout import Layout
from edgevm.shared.libvirt.plan import DiskPlan, DomainPlan, DomainType, NicModel, NicPlan
from edgevm.shared.netstate import NicRecord
from edgevm.shared.objects import Image
from edgevm.shared.spec import VmSpec

_UUID_NAMESPACE = uuid.UUID("6f0e3f5e-5b7a-4a53-9d55-1c2b7e0e6a01")


@dataclass(frozen=True)
class VolumeFile:
    """How one disk file of a VM comes to be: an overlay on an image, a new blank disk, or used as it is."""

    path: Path
    format: str
    device: str
    bus: str
    create: str  # "overlay" | "blank" | "none"
    backing: Path | None = None
    backing_format: str | None = None
    size: int | None = None


def vm_uuid(node: str, vm: str) -> str:
    """Return the VM's domain UUID, derived from node and name so a lost domain is redefined the same."""
    return str(uuid.uuid5(_UUID_NAMESPACE, f"{node}/{vm}"))


def seed_content(spec: VmSpec, network_config: str | None = None) -> SeedContent:
    """Return what the VM's NoCloud seed carries; the user's own network-config wins over netplumb's."""
    ci = spec.cloud_init
    return SeedContent(
        vm_name=spec.name,
        hostname=spec.hostname or spec.name,
        user_data=ci.user_data if ci else None,
        network_config=(ci.network_config if ci and ci.network_config else None) or network_config,
        meta_data=ci.meta_data if ci else None,
    )


def nic_plans(spec: VmSpec, nics: list[NicRecord]) -> list[NicPlan]:
    """Return the domain NICs for netplumb's NIC records; virtio NICs on a virtio VM, e1000 otherwise."""
    model: NicModel = "virtio" if spec.device_bus == "virtio" else "e1000"
    return [NicPlan(nic.mac, nic.bridge or None, model, nic.tap or None) for nic in sorted(nics, key=lambda n: n.index)]


class Planner:
    """Turns specs into file plans and domain plans for one node's layout."""

    def __init__(self, layout: Layout, node: str, domain_type: DomainType) -> None:
        self.layout = layout
        self.node = node
        self.domain_type = domain_type

    def seed_path(self, vm: str) -> Path:
        """Return the VM's seed ISO path."""
        return self.layout.vm_dir(vm) / "seed.iso"

    def files(self, spec: VmSpec, images: dict[str, Image], store_path: dict[str, Path]) -> list[VolumeFile]:
        """Return the disk files of a VM, boot disk first; `store_path` maps image names to their files."""
        vm_dir = self.layout.vm_dir(spec.name)
        files: list[VolumeFile] = []
        image = images[spec.image]
        if image.format == "iso":
            files.append(VolumeFile(store_path[spec.image], "raw", "cdrom", spec.device_bus, "none"))
        else:
            files.append(VolumeFile(vm_dir / "root.qcow2", "qcow2", "disk", spec.device_bus, "overlay",
                                    store_path[spec.image], image.format))
        for volume in spec.volumes:
            bus = volume.bus or spec.device_bus
            target = vm_dir / f"volume-{volume.name}.qcow2"
            if volume.size is not None:
                assert isinstance(volume.size, int)
                files.append(VolumeFile(target, "qcow2", "disk", bus, "blank", size=volume.size))
                continue
            assert volume.source is not None
            if volume.source in images:
                source_image = images[volume.source]
                if volume.kind == "cdrom" or source_image.format == "iso":
                    # An ISO is always a read-only cd-rom: the store's file is shared by every VM.
                    files.append(VolumeFile(store_path[volume.source], "raw", "cdrom", bus, "none"))
                else:
                    files.append(VolumeFile(target, "qcow2", "disk", bus, "overlay",
                                            store_path[volume.source], source_image.format))
            else:
                # A file of the volume store (already confined by the caller), used as it is.
                path = Path(store_path[volume.source])
                fmt = "qcow2" if path.suffix == ".qcow2" else "raw"
                files.append(VolumeFile(path, fmt, volume.kind, bus, "none"))
        return files

    def domain(
        self, spec: VmSpec, revision: int, files: list[VolumeFile], nics: list[NicPlan] | None = None
    ) -> DomainPlan:
        """Return the DomainPlan of a VM: its disks, the seed cd-rom, NICs, console log and NVRAM."""
        vm_dir = self.layout.vm_dir(spec.name)
        disks = [
            DiskPlan(str(f.path), "qcow2" if f.format == "qcow2" else "raw", f.device,  # type: ignore[arg-type]
                     f.bus, readonly=f.device == "cdrom")  # type: ignore[arg-type]
            for f in files
        ]
        disks.append(DiskPlan(str(self.seed_path(spec.name)), "raw", "cdrom", spec.device_bus, readonly=True))
        return DomainPlan(
            name=spec.name,
            uuid=vm_uuid(self.node, spec.name),
            revision=revision,
            domain_type=self.domain_type,
            firmware=spec.firmware,
            vcpus=spec.cpu,
            memory_bytes=spec.memory_bytes,
            serial_log_path=str(vm_dir / "console.log"),
            nvram_path=str(vm_dir / "nvram.fd") if spec.firmware == "uefi" else None,
            disks=tuple(disks),
            nics=tuple(nics or ()),
        )
