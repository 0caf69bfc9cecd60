"""Deterministic names of the namespaces and links netplumb creates.

Linux link names hold at most 15 characters. A VRF or virtual network name short enough is used as it
is; a longer one becomes its first characters, an underscore and a hash. Protocol names never contain
an underscore, so a hashed tag can never equal a plain one.
"""

import hashlib

IFNAME_MAX = 15
TAG_MAX = 10
DEFAULT_VRF = "default"
DEFAULT_NETNS_PREFIX = "edgevm-"

# Fixed names inside a VRF namespace: each VRF has its own namespace, so they never collide.
VRF_LINK = "evlink"
VRF_UPLINK = "evuplink"


def _digest(text: str, size: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:size]


def tag(name: str, room: int = TAG_MAX) -> str:
    """The name itself when it fits in `room` characters, else a truncated name plus a short hash."""
    if len(name) <= room:
        return name
    return f"{name[: room - 7]}_{_digest(name, 6)}"


def vrf_netns(vrf: str, prefix: str = DEFAULT_NETNS_PREFIX) -> str | None:
    """The network namespace of a VRF; None for the default VRF, which is the node's own namespace."""
    return None if vrf == DEFAULT_VRF else f"{prefix}{vrf}"


def vrf_bridge(vrf: str) -> str:
    """The bridge holding the VRF's gateway address, inside the VRF namespace."""
    return f"evbr-{tag(vrf)}"


def host_bridge(vrf: str) -> str:
    """The address-less bridge in the node namespace that libvirt attaches a VRF's taps to."""
    return vrf_bridge(vrf) if vrf == DEFAULT_VRF else f"evh-{tag(vrf)}"


def host_port(vrf: str) -> str:
    """The node-side end of the veth joining a VRF's host bridge to its namespace bridge."""
    return f"evp-{tag(vrf)}"


def uplink(vrf: str) -> str:
    """The node-side end of the veth that routes a VRF namespace to the node."""
    return f"evu-{tag(vrf)}"


def vnet_bridge(vnet: str) -> str:
    """The address-less bridge in the node namespace joining a virtual network's VXLAN and VRFs."""
    return f"evn-{tag(vnet)}"


def vnet_vxlan(vnet: str) -> str:
    """The VXLAN device of a virtual network, in the node namespace."""
    return f"evx-{tag(vnet)}"


def vnet_interface(vnet: str) -> str:
    """The VRF-side interface on a virtual network, holding the virtual IPs of the VRF's VMs."""
    return f"evi-{tag(vnet)}"


def vnet_port(vrf: str, vnet: str) -> str:
    """The node-side end of the veth joining a VRF to a virtual network's bridge."""
    return f"eva{_digest(f'{vrf}/{vnet}', IFNAME_MAX - 3)}"


def vm_tap(vm: str, index: int) -> str:
    """The tap device of a VM NIC (libvirt's `<target dev>`)."""
    return f"evt-{tag(f'{vm}-{index}', IFNAME_MAX - 4)}"
