"""The probe of whether this host can really run KVM guests, which picks the domain type."""

import asyncio
import fcntl
import os
import xml.etree.ElementTree as ET
from collections.abc import Collection
from pathlib import Path

import libvirt

from edgevm.shared.libvirt.connection import HypervisorConnection
from edgevm.shared.libvirt.plan import DomainType

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12  # the only version there has ever been
VIRTUALIZATION_FLAGS = frozenset({"vmx", "svm"})  # Intel VT-x, AMD-V


def choose_domain_type(
    *, kvm_device_usable: bool, cpu_flags: Collection[str], hypervisor_offers_kvm: bool
) -> DomainType:
    """'kvm' when the KVM device answers, the CPU shows VT-x/AMD-V and libvirt offers kvm; else 'qemu' (TCG)."""
    # A VM whose hypervisor exposes /dev/kvm without nested VT-x passes the first and last checks, yet a
    # kvm guest then hangs: only the CPU flags tell.
    has_virtualization = not VIRTUALIZATION_FLAGS.isdisjoint(cpu_flags)
    return "kvm" if kvm_device_usable and has_virtualization and hypervisor_offers_kvm else "qemu"


def kvm_device_usable(path: Path) -> bool:
    """Whether path opens read-write as a KVM device that speaks the KVM API."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION) == KVM_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The CPU flags listed in /proc/cpuinfo text (those of the first CPU)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def offers_kvm(capabilities_xml: str) -> bool:
    """Whether libvirt's capabilities list a kvm domain type for an x86_64 guest."""
    root = ET.fromstring(capabilities_xml)
    return any(
        domain.get("type") == "kvm"
        for guest in root.iter("guest")
        if guest.find("arch[@name='x86_64']") is not None
        for domain in guest.iterfind("arch/domain")
    )


async def detect_domain_type(
    connection: HypervisorConnection,
    *,
    kvm_device: Path = Path("/dev/kvm"),
    cpuinfo: Path = Path("/proc/cpuinfo"),
) -> DomainType:
    """The domain type to give this host's domains, probed from the KVM device, the CPU and libvirt."""
    usable = await asyncio.to_thread(kvm_device_usable, kvm_device)
    flags = cpu_flags(await asyncio.to_thread(cpuinfo.read_text))
    capabilities = await connection.call(libvirt.virConnect.getCapabilities)
    return choose_domain_type(kvm_device_usable=usable, cpu_flags=flags, hypervisor_offers_kvm=offers_kvm(capabilities))


def guest_process_ids(capabilities_xml: str, domain_type: DomainType) -> tuple[int, int] | None:
    """The uid and gid QEMU runs `domain_type` guests as (libvirt's DAC label), or None when libvirt has none."""
    root = ET.fromstring(capabilities_xml)
    for model in root.iterfind("host/secmodel"):
        if model.findtext("model") != "dac":
            continue
        for label in model.iterfind("baselabel"):
            if label.get("type") == domain_type and label.text:
                uid, _, gid = label.text.partition(":")  # "+64055:+64055"
                return int(uid.lstrip("+")), int(gid.lstrip("+"))
    return None


async def guest_user(connection: HypervisorConnection, domain_type: DomainType) -> tuple[int, int] | None:
    """The uid and gid this host's QEMU guests run as, from libvirt's capabilities."""
    return guest_process_ids(await connection.call(libvirt.virConnect.getCapabilities), domain_type)
