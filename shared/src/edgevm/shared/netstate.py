"""What netplumb keeps in `edgevm_net`, and the node-internal requests lifecycle makes of netplumb.

The bucket is netplumb's: only netplumb writes it. Lifecycle and flowwatch read it (flowwatch builds its
address map from the `vm` records, live, with a KV watch). Keys, each under the node id:

    <node>.vrf.<name>     VrfRecord
    <node>.vnet.<name>    VnetRecord
    <node>.vm.<vm>        VmNetRecord

The internal subjects (`edgevm.<node>.net.vm.<verb>`) are not part of PROTOCOL.md's public contract;
docs/protocol.md lists them as node-internal.
"""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

from edgevm.shared.spec import Name, Network, PortMapping, Spec, VirtualInterface, VnetAttachment, check_hostname


def vrf_key(node: str, name: str) -> str:
    """Return the `edgevm_net` key of a VRF."""
    return f"{node}.vrf.{name}"


def vnet_key(node: str, name: str) -> str:
    """Return the `edgevm_net` key of a virtual network."""
    return f"{node}.vnet.{name}"


def vm_key(node: str, vm: str) -> str:
    """Return the `edgevm_net` key of a VM's network record."""
    return f"{node}.vm.{vm}"


class VrfRecord(Struct, kw_only=True):
    """A VRF as netplumb keeps it. `netns` is the namespace name (None: the node's own namespace)."""

    name: str
    subnet: str
    gateway: str
    netns: str | None
    uplink: str | None = None  # the /31 between the node namespace and the VRF namespace
    created_at: str


class VnetRecord(Struct, kw_only=True):
    """A virtual network as netplumb keeps it."""

    name: str
    cidr: str
    vni: int
    peers: list[str] = []
    created_at: str
    local: str | None = None  # this node's underlay address the VXLAN device sends from


class NicRecord(Struct, kw_only=True):
    """One NIC of a VM: what libvirt plugs in, and the address the guest is given.

    A `bridge` NIC (the VM's NIC in its VRF) has an address and a bridge: libvirt `<interface type='bridge'>`.
    A `passthrough` NIC receives all traffic of a host interface (a virtual interface): it has no address,
    gateway or bridge (all ""), and its tap must stay on no bridge: libvirt `<interface type='ethernet'>`.
    """

    index: int
    mac: str
    address: str  # IPv4 with prefix, e.g. 10.10.0.5/24 ("" for a passthrough NIC)
    gateway: str
    bridge: str  # the node-namespace bridge libvirt attaches the tap to ("" for a passthrough NIC)
    tap: str  # the tap device name libvirt is asked to create
    kind: Literal["bridge", "passthrough"] = "bridge"
    name: str = ""  # the NIC's id in the network-config: "eth0", or a virtual interface's `destination`


class VmNetRecord(Struct, kw_only=True):
    """A VM's network as netplumb allocated it; `active` while the VM runs (its port mappings are applied).

    `netns` is the namespace the VM's traffic (and its conntrack entries) lives in: its VRF's, or None for
    the node's own namespace. Flowwatch attributes a conntrack entry seen in `netns` to this VM when one of
    its ends is a NIC address.
    """

    vm: str
    vrf: str
    netns: str | None
    nics: list[NicRecord]
    port_mappings: list[PortMapping] = []
    virtual_networks: list[VnetAttachment] = []
    virtual_interfaces: list[VirtualInterface] = []
    active: bool = False
    updated_at: str
    # The passthrough NICs of the virtual interfaces (kept apart so `nics` only holds addressed NICs).
    passthrough_nics: list[NicRecord] = []


NetStep = Literal["links", "vrf", "vnet", "attach", "detach", "taps", "tables", "vif", "unwire"]


class NetFailure(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A step of bringing the kernel to netplumb's records that failed: which step, for what, and why.

    `step`: removing unused `links`; making a `vrf` or a virtual network (`vnet`); `attach`ing a VRF to a
    virtual network or `detach`ing it; putting VM `taps` on their bridges; the nftables `tables` (of every
    VM); wiring a virtual interface (`vif`) or `unwire`ing one. The names say what it was for: `vrf`,
    `network` (a virtual network), `interface` (a host interface). `what` is the step in words; `str()` of
    a failure is `<what>: <error>`, the sentence logs, replies and `net.failed` carry.
    """

    step: NetStep
    what: str
    error: str
    vrf: str | None = None
    network: str | None = None
    interface: str | None = None

    def __str__(self) -> str:
        return f"{self.what}: {self.error}"


# Node-internal requests: lifecycle -> netplumb. Checked as strictly as the public ones (unknown fields refused).
class NetPrepare(Spec, kw_only=True):
    """`net.vm.prepare`: allocate (or re-check) the VM's NICs for `network`; changes nothing on failure."""

    vm: Name
    network: Network
    hostname: str | None = None

    def __post_init__(self) -> None:
        check_hostname(self.hostname)


class NetPrepared(Struct, kw_only=True):
    """Reply of `net.vm.prepare`: the NICs to put in the domain and the cloud-init network-config (v2 YAML).

    `nics` holds the VM's bridge NIC first, then one passthrough NIC per virtual interface.
    """

    nics: list[NicRecord]
    network_config: str


class NetVmRef(Spec, kw_only=True):
    """`net.vm.activate` / `net.vm.deactivate` / `net.vm.release`: the VM started / stopped / is gone."""

    vm: Name


__all__ = [
    "NetFailure",
    "NetPrepare",
    "NetPrepared",
    "NetStep",
    "NetVmRef",
    "Network",
    "NicRecord",
    "PortMapping",
    "VirtualInterface",
    "VmNetRecord",
    "VnetAttachment",
    "VnetRecord",
    "VrfRecord",
    "vm_key",
    "vnet_key",
    "vrf_key",
]
