"""The plain values a libvirt domain is built from: a domain plan with its disks and NICs."""

import re
import uuid as uuid_module
from dataclasses import dataclass
from typing import Literal, get_args

DomainType = Literal["kvm", "qemu"]
Firmware = Literal["bios", "uefi"]
Machine = Literal["pc", "q35"]
DiskFormat = Literal["qcow2", "raw"]
DiskDevice = Literal["disk", "cdrom"]
DiskBus = Literal["virtio", "ide", "sata"]
NicModel = Literal["virtio", "e1000"]

VM_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")
IDE_SLOTS = 4  # one IDE controller: two buses of two units each (hda..hdd)


def _check_choice(what: str, value: object, allowed: object) -> None:
    choices = get_args(allowed)
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, choices))}, not {value!r}")


def _check_path(what: str, path: str) -> None:
    if not path.startswith("/") or "\0" in path:
        raise ValueError(f"{what} must be an absolute path, not {path!r}")


@dataclass(frozen=True, slots=True)
class DiskPlan:
    """One disk or cd-rom of a domain, backed by a file."""

    path: str
    format: DiskFormat = "qcow2"
    device: DiskDevice = "disk"
    bus: DiskBus = "virtio"
    readonly: bool = False

    def __post_init__(self) -> None:
        _check_path("disk path", self.path)
        _check_choice("disk format", self.format, DiskFormat)
        _check_choice("disk device", self.device, DiskDevice)
        _check_choice("disk bus", self.bus, DiskBus)

    @property
    def effective_bus(self) -> DiskBus:
        """The bus the disk really gets: virtio has no cd-rom, so a cd-rom asked on virtio goes to sata."""
        return "sata" if self.device == "cdrom" and self.bus == "virtio" else self.bus


@dataclass(frozen=True, slots=True)
class NicPlan:
    """One NIC of a domain: a tap plugged into a host bridge, or a bare tap (`bridge` None) that netplumb wires."""

    mac: str
    bridge: str | None
    model: NicModel = "virtio"
    tap: str | None = None  # the tap device libvirt creates; None lets libvirt name it

    def __post_init__(self) -> None:
        if not MAC.match(self.mac) or int(self.mac[:2], 16) & 1:
            raise ValueError(f"NIC mac must be a unicast address like 52:54:00:12:34:56, not {self.mac!r}")
        for what, name in (("bridge", self.bridge), ("tap", self.tap)):
            if name is not None and (not 0 < len(name) <= 15 or "/" in name or any(c.isspace() for c in name)):
                raise ValueError(f"NIC {what} must be a Linux interface name, not {name!r}")
        if self.bridge is None and self.tap is None:
            raise ValueError("a NIC without a bridge needs a tap name")
        _check_choice("NIC model", self.model, NicModel)


@dataclass(frozen=True, slots=True)
class DomainPlan:
    """Everything edgevm decides about a VM's libvirt domain; the first 'disk' device is the boot disk."""

    name: str
    uuid: str
    revision: int
    domain_type: DomainType
    firmware: Firmware
    vcpus: int
    memory_bytes: int
    serial_log_path: str
    nvram_path: str | None = None
    secure_boot: bool = False
    disks: tuple[DiskPlan, ...] = ()
    nics: tuple[NicPlan, ...] = ()

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples, so a plan stays immutable.
        object.__setattr__(self, "disks", tuple(self.disks))
        object.__setattr__(self, "nics", tuple(self.nics))
        if not VM_NAME.match(self.name):
            raise ValueError(f"VM name {self.name!r} does not match {VM_NAME.pattern}")
        try:
            canonical = str(uuid_module.UUID(self.uuid))
        except ValueError:
            raise ValueError(f"uuid {self.uuid!r} is not a UUID") from None
        object.__setattr__(self, "uuid", canonical)
        if self.revision < 0:
            raise ValueError(f"revision must be >= 0, not {self.revision}")
        _check_choice("domain type", self.domain_type, DomainType)
        _check_choice("firmware", self.firmware, Firmware)
        if self.vcpus < 1:
            raise ValueError(f"vcpus must be >= 1, not {self.vcpus}")
        if self.memory_bytes < 1:
            raise ValueError(f"memory_bytes must be >= 1, not {self.memory_bytes}")
        _check_path("serial log path", self.serial_log_path)
        if self.firmware == "uefi":
            if self.nvram_path is None:
                raise ValueError("a uefi domain needs an nvram_path (its own copy of the UEFI variables)")
            _check_path("nvram path", self.nvram_path)
        elif self.nvram_path is not None or self.secure_boot:
            raise ValueError("nvram_path and secure_boot are for uefi domains only")
        ide = sum(1 for disk in self.disks if disk.effective_bus == "ide")
        if ide > IDE_SLOTS:
            raise ValueError(f"at most {IDE_SLOTS} ide devices fit on the ide controller, not {ide}")
        if self.secure_boot and ide:
            raise ValueError("secure boot needs the q35 machine, which has no ide controller")

    @property
    def machine(self) -> Machine:
        """The machine type: pc (i440fx) for bios; q35 for uefi unless an ide device needs pc's controller."""
        # q35 has no IDE controller (libvirt: "IDE controllers are unsupported for this QEMU binary or
        # machine type"), while OVMF without secure boot also runs on pc, so uefi + ide gets pc.
        if self.firmware == "bios" or any(disk.effective_bus == "ide" for disk in self.disks):
            return "pc"
        return "q35"
