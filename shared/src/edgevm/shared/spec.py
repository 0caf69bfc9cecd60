"""VmSpec and its parts: what a user writes to define a VM (PROTOCOL.md, Objects)."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from edgevm.shared.errors import FieldError
from edgevm.shared.limits import (
    MAX_DEPTH,
    MAX_PORT_MAPPINGS,
    MAX_VIRTUAL_INTERFACES,
    MAX_VIRTUAL_NETWORKS,
    MAX_VOLUMES,
    depth_of,
    excerpt,
)
from edgevm.shared.units import parse_size

# Patterns end in \Z, not $: msgspec matches with re.search, where $ also matches before a final newline.
NAME_BODY = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
NAME_PATTERN = rf"^{NAME_BODY}\Z"
Name = Annotated[str, Meta(pattern=NAME_PATTERN, max_length=63)]
# Interface names on Linux: at most 15 bytes, no '/', no whitespace, not '.' or '..'.
InterfaceName = Annotated[str, Meta(pattern=r"^(?!\.\.?\Z)[^/\s:]{1,15}\Z")]
Port = Annotated[int, Meta(ge=1, le=65535)]
# Free text libvirt keeps in XML (a snapshot's <description>): XML 1.0 holds no control character but tab,
# newline and carriage return, and neither U+FFFE nor U+FFFF (libvirt refused them only once the task ran).
TEXT_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]*\Z"
Description = Annotated[str, Meta(max_length=1024, pattern=TEXT_PATTERN)]
# Checked by ipaddress after decoding; the lengths bound what an error message can quote
# ("255.255.255.255", "255.255.255.255/255.255.255.255").
Ipv4Address = Annotated[str, Meta(max_length=15)]
Ipv4Network = Annotated[str, Meta(max_length=31)]
Size = int | str
Firmware = Literal["bios", "uefi"]
Bus = Literal["virtio", "ide", "sata"]

USER_DATA_MAX = 64 * 1024
_LABEL = r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*\Z")


class Spec(Struct, forbid_unknown_fields=True, omit_defaults=False):
    """Base of every user-written struct: unknown fields are refused."""


def _size(field: str, value: Size) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise FieldError(field, str(exc)) from None


class Volume(Spec):
    """A disk or cd-rom of a VM: a new blank disk of `size`, or a copy-on-write view of `source`."""

    name: Name
    kind: Literal["disk", "cdrom"] = "disk"
    size: Size | None = None
    source: Annotated[str, Meta(min_length=1, max_length=4096)] | None = None
    bus: Bus | None = None

    def __post_init__(self) -> None:
        if self.size is not None:
            self.size = _size("size", self.size)
            if self.size <= 0:
                raise FieldError("size", "must be greater than 0")
        if self.kind == "cdrom" and self.size is not None:
            raise FieldError("size", "a cdrom has no size: give its `source` (an ISO image)")
        if self.size is None and self.source is None:
            raise FieldError("source", "give either `size` (a new blank disk) or `source` (an image or a volume)")
        if self.size is not None and self.source is not None:
            raise FieldError("size", "give either `size` or `source`, not both")


class PortMapping(Spec):
    """A host port forwarded to a port of the VM; a null protocol means tcp and udp."""

    host_interface: InterfaceName
    host_port: Port
    vm_port: Port
    protocol: Literal["tcp", "udp"] | None = "tcp"

    def protocols(self) -> tuple[str, ...]:
        """Return the transport protocols this mapping carries."""
        return (self.protocol,) if self.protocol else ("tcp", "udp")


class VnetAttachment(Spec):
    """The VM's membership of a virtual network, answering on `virtual_ip`."""

    network: Name
    virtual_ip: Ipv4Address
    allow_outbound: bool = False

    def __post_init__(self) -> None:
        try:
            ipaddress.IPv4Address(self.virtual_ip)
        except ValueError:
            raise FieldError("virtual_ip", f"must be an IPv4 address, got {excerpt(self.virtual_ip)}") from None


class VirtualInterface(Spec):
    """A host interface whose traffic is all forwarded to the VM's NIC `destination`."""

    name: InterfaceName
    destination: Annotated[str, Meta(min_length=1, max_length=15)]


class Network(Spec):
    """Where a VM is plugged: its VRF, host port mappings, virtual networks and virtual interfaces."""

    vrf: Name = "default"
    port_mappings: Annotated[list[PortMapping], Meta(max_length=MAX_PORT_MAPPINGS)] = []
    virtual_networks: Annotated[list[VnetAttachment], Meta(max_length=MAX_VIRTUAL_NETWORKS)] = []
    virtual_interfaces: Annotated[list[VirtualInterface], Meta(max_length=MAX_VIRTUAL_INTERFACES)] = []

    def __post_init__(self) -> None:
        seen: set[tuple[str, str, int]] = set()
        for i, mapping in enumerate(self.port_mappings):
            for protocol in mapping.protocols():
                key = (protocol, mapping.host_interface, mapping.host_port)
                if key in seen:
                    raise FieldError(
                        f"port_mappings[{i}].host_port",
                        f"{protocol} {mapping.host_interface}:{mapping.host_port} is mapped twice",
                    )
                seen.add(key)
        _unique("virtual_networks", [a.network for a in self.virtual_networks], "network")
        _unique("virtual_interfaces", [v.name for v in self.virtual_interfaces], "name")


class CloudInit(Spec):
    """Cloud-init data handed to the guest through a NoCloud seed."""

    user_data: Annotated[str, Meta(max_length=USER_DATA_MAX)] = ""
    network_config: str | None = None
    meta_data: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if len(self.user_data.encode()) > USER_DATA_MAX:
            raise FieldError("user_data", f"must be at most {USER_DATA_MAX} bytes")
        if self.meta_data is not None and depth_of(self.meta_data) > MAX_DEPTH:
            raise FieldError("meta_data", f"nests deeper than {MAX_DEPTH} levels of objects and arrays")


Volumes = Annotated[list[Volume], Meta(max_length=MAX_VOLUMES)]
ImageRefName = Annotated[str, Meta(min_length=1, max_length=255)]


class VmSpec(Spec):
    """What the user writes to define a VM; memory is returned in bytes."""

    name: Name
    image: ImageRefName
    description: Description = ""
    firmware: Firmware = "bios"
    device_bus: Bus = "virtio"
    hostname: str | None = None
    stop_timeout: Annotated[int, Meta(ge=1, le=3600)] = 120
    auto_start: bool = False
    cpu: Annotated[int, Meta(ge=1, le=512)] = 1
    memory: Size = "512MB"
    volumes: Volumes = []
    network: Network = msgspec.field(default_factory=Network)
    cloud_init: CloudInit | None = None

    def __post_init__(self) -> None:
        self.memory = _size("memory", self.memory)
        if self.memory < 16 * 1024**2:
            raise FieldError("memory", f"must be at least 16MiB (16777216 bytes), got {self.memory} bytes")
        check_hostname(self.hostname)
        _unique("volumes", [v.name for v in self.volumes], "name")

    @property
    def memory_bytes(self) -> int:
        """Return memory in bytes (always an int after decoding)."""
        assert isinstance(self.memory, int)
        return self.memory


def check_hostname(hostname: str | None) -> None:
    """Raise FieldError unless `hostname` is None or an RFC 1123 host name."""
    if hostname is not None and not _HOSTNAME.match(hostname):
        raise FieldError("hostname", "must be an RFC 1123 host name (letters, digits, '-', dots between labels)")


def _unique(field: str, names: list[str], key: str) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise FieldError(f"{field}[{i}].{key}", f"{excerpt(name)} is used twice")
        seen.add(name)


IMMUTABLE_FIELDS = ("name", "image", "firmware", "device_bus")
