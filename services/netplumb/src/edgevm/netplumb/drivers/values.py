"""The plain values netplumb's kernel drivers take: VRFs, virtual networks, NICs, interfaces and rules as the
kernel holds them (the `...Plan`s), made from records by the `plan_...` functions."""

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Literal

from edgevm.netplumb import ipam, names

Protocol = Literal["tcp", "udp"]
VXLAN_PORT = 4789
VXLAN_MTU = 1450  # a 1500-byte underlay minus the 50 bytes of VXLAN encapsulation


@dataclass(frozen=True)
class VrfPlan:
    """A VRF as the kernel holds it: subnet, gateway, namespace, bridges and the /31 uplink to the node."""

    name: str
    subnet: IPv4Network
    gateway: IPv4Address
    netns: str | None  # None: the node's own namespace (the default VRF)
    bridge: str  # holds the gateway, in `netns`
    host_bridge: str  # libvirt attaches taps here, in the node namespace (== bridge for the default VRF)
    uplink: IPv4Network | None  # node side is the first address, VRF side the second; None for default

    @property
    def is_default(self) -> bool:
        """Whether this VRF lives in the node's own namespace."""
        return self.netns is None

    @property
    def gateway_interface(self) -> IPv4Interface:
        """The gateway address with the subnet's prefix length."""
        return IPv4Interface(f"{self.gateway}/{self.subnet.prefixlen}")

    @property
    def uplink_node(self) -> IPv4Interface:
        """The node-side uplink address (the VRF namespace's default gateway)."""
        assert self.uplink is not None
        return IPv4Interface(f"{self.uplink[0]}/{self.uplink.prefixlen}")

    @property
    def uplink_vrf(self) -> IPv4Interface:
        """The VRF-side uplink address (port mappings are DNATed to it by the node)."""
        assert self.uplink is not None
        return IPv4Interface(f"{self.uplink[1]}/{self.uplink.prefixlen}")


def plan_vrf(
    name: str,
    subnet: IPv4Network | str,
    *,
    uplink: IPv4Network | str | None = None,
    gateway: IPv4Address | str | None = None,
    netns_prefix: str = names.DEFAULT_NETNS_PREFIX,
) -> VrfPlan:
    """The VrfPlan of a VRF; the gateway defaults to the subnet's first host address."""
    net = IPv4Network(subnet)
    netns = names.vrf_netns(name, netns_prefix)
    link = IPv4Network(uplink) if netns is not None and uplink is not None else None
    if netns is not None and (link is None or link.prefixlen != 31):
        raise ValueError(f"VRF {name!r} needs a /31 uplink network")
    return VrfPlan(
        name=name,
        subnet=net,
        gateway=IPv4Address(gateway) if gateway is not None else ipam.gateway_address(net),
        netns=netns,
        bridge=names.vrf_bridge(name),
        host_bridge=names.host_bridge(name),
        uplink=link,
    )


@dataclass(frozen=True)
class VmNicPlan:
    """A VM NIC: its VRF, MAC, static address (with the subnet's prefix) and tap device name."""

    vm: str
    vrf: str
    index: int
    mac: str
    address: IPv4Interface
    tap: str


def plan_nic(node: str, vm: str, index: int, vrf: VrfPlan, address: IPv4Address | str) -> VmNicPlan:
    """The VmNicPlan of a VM's NIC in a VRF: deterministic MAC and tap name, address with the prefix."""
    return VmNicPlan(
        vm=vm,
        vrf=vrf.name,
        index=index,
        mac=ipam.mac_address(node, vm, index),
        address=IPv4Interface(f"{address}/{vrf.subnet.prefixlen}"),
        tap=names.vm_tap(vm, index),
    )


@dataclass(frozen=True)
class PortMappingRule:
    """A host port forwarded to a VM port; protocol None means both tcp and udp."""

    protocol: Protocol | None
    host_interface: str
    host_port: int
    vm_address: IPv4Address
    vm_port: int
    vrf: str = names.DEFAULT_VRF

    @property
    def protocols(self) -> tuple[Protocol, ...]:
        """The transport protocols this mapping covers."""
        return ("tcp", "udp") if self.protocol is None else (self.protocol,)


@dataclass(frozen=True)
class VnetPlan:
    """A virtual network on this node: overlay CIDR, VXLAN id, local underlay address and peer nodes."""

    name: str
    cidr: IPv4Network
    vni: int
    local: IPv4Address
    peers: tuple[IPv4Address, ...]
    bridge: str  # address-less, in the node namespace: the VXLAN device and each VRF's veth
    vxlan: str
    interface: str  # the VRF-side veth end holding the virtual IPs
    port: int = VXLAN_PORT
    mtu: int = VXLAN_MTU


def plan_vnet(
    name: str,
    cidr: IPv4Network | str,
    vni: int,
    local: IPv4Address | str,
    peers: Iterable[IPv4Address | str] = (),
    *,
    port: int = VXLAN_PORT,
    mtu: int = VXLAN_MTU,
) -> VnetPlan:
    """The VnetPlan of a virtual network; peers are kept sorted and without duplicates."""
    own = IPv4Address(local)
    return VnetPlan(
        name=name,
        cidr=IPv4Network(cidr),
        vni=vni,
        local=own,
        peers=tuple(sorted({IPv4Address(p) for p in peers} - {own})),
        bridge=names.vnet_bridge(name),
        vxlan=names.vnet_vxlan(name),
        interface=names.vnet_interface(name),
        port=port,
        mtu=mtu,
    )


@dataclass(frozen=True)
class VirtualIpRule:
    """A VM's 1:1 NAT on a virtual network, and whether it may open connections into it."""

    vm_address: IPv4Address
    virtual_ip: IPv4Address
    allow_outbound: bool
    vnet: str
    vrf: str = names.DEFAULT_VRF


@dataclass(frozen=True)
class VirtualInterfacePlan:
    """A host interface whose whole traffic is exchanged with a VM NIC's tap."""

    host_interface: str
    tap: str
