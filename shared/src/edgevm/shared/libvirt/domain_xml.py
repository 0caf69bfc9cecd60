"""libvirt domain XML built from a DomainPlan, element by element (user values are never formatted in)."""

import xml.etree.ElementTree as ET
from collections.abc import Sequence

from edgevm.shared.libvirt.metadata import DomainMetadata, metadata_element
from edgevm.shared.libvirt.naming import domain_name

from .plan import DiskBus, DiskPlan, DomainPlan, NicPlan

TARGET_PREFIX: dict[DiskBus, str] = {"virtio": "vd", "sata": "sd", "ide": "hd"}
_UEFI_FEATURES = ("secure-boot", "enrolled-keys")


def target_name(bus: DiskBus, index: int) -> str:
    """The guest device name of the index-th disk on a bus, as libvirt names it: vda..vdz, vdaa, ..."""
    letters = ""
    number = index + 1
    while number:
        number, rest = divmod(number - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return TARGET_PREFIX[bus] + letters


def disk_targets(disks: Sequence[DiskPlan]) -> list[str]:
    """The target device of each disk, counted per bus in the order given."""
    used: dict[DiskBus, int] = {}
    targets = []
    for disk in disks:
        bus = disk.effective_bus
        targets.append(target_name(bus, used.get(bus, 0)))
        used[bus] = used.get(bus, 0) + 1
    return targets


def build_domain_xml(plan: DomainPlan) -> str:
    """The domain XML of a plan: headless, ACPI on, one serial console logged to a file."""
    domain = ET.Element("domain", type=plan.domain_type)
    _text(domain, "name", domain_name(plan.name))
    _text(domain, "uuid", plan.uuid)
    ET.SubElement(domain, "metadata").append(metadata_element(DomainMetadata(plan.name, plan.revision)))
    # libvirt takes bytes and rounds up to whole KiB (and reports KiB when read back).
    _text(domain, "memory", str(plan.memory_bytes), unit="b")
    _text(domain, "vcpu", str(plan.vcpus), placement="static")
    domain.append(_os(plan))
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    if plan.secure_boot:
        ET.SubElement(features, "smm", state="on")  # secure boot firmware refuses to run without SMM
    ET.SubElement(domain, "clock", offset="utc")
    _text(domain, "on_poweroff", "destroy")
    _text(domain, "on_reboot", "restart")
    _text(domain, "on_crash", "destroy")
    domain.append(_devices(plan))
    return ET.tostring(domain, encoding="unicode")


def _os(plan: DomainPlan) -> ET.Element:
    os = ET.Element("os")
    _text(os, "type", "hvm", arch="x86_64", machine=plan.machine)
    if plan.firmware == "uefi":
        os.set("firmware", "efi")
        # Debian's firmware autoselection prefers secure boot with enrolled keys, under which an unsigned
        # image fails with "Access Denied": ask for the features explicitly either way.
        firmware = ET.SubElement(os, "firmware")
        enabled = "yes" if plan.secure_boot else "no"
        for feature in _UEFI_FEATURES:
            ET.SubElement(firmware, "feature", enabled=enabled, name=feature)
        assert plan.nvram_path is not None  # DomainPlan guarantees it for uefi
        _text(os, "nvram", plan.nvram_path)
    return os


def _devices(plan: DomainPlan) -> ET.Element:
    devices = ET.Element("devices")
    boot_disk = next((disk for disk in plan.disks if disk.device == "disk"), None)
    for disk, target in zip(plan.disks, disk_targets(plan.disks), strict=True):
        devices.append(_disk(disk, target, boot=disk is boot_disk))
    if any(disk.effective_bus == "sata" for disk in plan.disks):
        # q35 has AHCI built in; on pc libvirt adds an AHCI controller (ich9-ahci) for this element.
        ET.SubElement(devices, "controller", type="sata", index="0")
    ET.SubElement(devices, "controller", type="usb", model="none")
    for nic in plan.nics:
        devices.append(_nic(nic))
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "log", file=plan.serial_log_path, append="on")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    ET.SubElement(devices, "memballoon", model="none")
    return devices


def _disk(disk: DiskPlan, target: str, *, boot: bool) -> ET.Element:
    element = ET.Element("disk", type="file", device=disk.device)
    ET.SubElement(element, "driver", name="qemu", type=disk.format)
    ET.SubElement(element, "source", file=disk.path)
    ET.SubElement(element, "target", dev=target, bus=disk.effective_bus)
    if disk.readonly or disk.device == "cdrom":
        ET.SubElement(element, "readonly")
    if boot:
        ET.SubElement(element, "boot", order="1")
    return element


def _nic(nic: NicPlan) -> ET.Element:
    element = ET.Element("interface", type="ethernet" if nic.bridge is None else "bridge")
    ET.SubElement(element, "mac", address=nic.mac)
    if nic.bridge is not None:
        ET.SubElement(element, "source", bridge=nic.bridge)
    if nic.tap is not None:
        ET.SubElement(element, "target", dev=nic.tap)
    ET.SubElement(element, "model", type=nic.model)
    return element


def _text(parent: ET.Element, tag: str, text: str, **attributes: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attributes)
    element.text = text
    return element
