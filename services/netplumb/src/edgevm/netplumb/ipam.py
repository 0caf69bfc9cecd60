"""Address and MAC allocation for VM NICs and VRF uplinks: pure functions, no kernel access."""

import hashlib
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

from edgevm.netplumb.errors import ExhaustedError

MAC_PREFIX = "52:54:00"  # QEMU's range: locally administered, unicast
DEFAULT_UPLINK_POOL = IPv4Network("169.254.64.0/18")  # link-local, clear of 169.254.169.254
# Ranges no VRF subnet or virtual network may overlap: they are never a network of VMs.
SPECIAL_RANGES = (
    (IPv4Network("0.0.0.0/8"), "'this network' 0.0.0.0/8"),
    (IPv4Network("127.0.0.0/8"), "loopback 127.0.0.0/8"),
    (IPv4Network("169.254.0.0/16"), f"link-local 169.254.0.0/16 (edgevm's VRF uplinks use {DEFAULT_UPLINK_POOL})"),
    (IPv4Network("224.0.0.0/4"), "multicast 224.0.0.0/4"),
    (IPv4Network("240.0.0.0/4"), "reserved 240.0.0.0/4 (and the broadcast address)"),
)


def unusable_because(net: IPv4Network, own: Iterable[tuple[IPv4Network, str]] = ()) -> str | None:
    """Why `net` cannot be a network of VMs on this node (a special range, or one of the node's `own`), or None."""
    if net.prefixlen == 0:
        return "is the whole IPv4 space (the default route)"
    for reserved, what in (*SPECIAL_RANGES, *own):
        if net.overlaps(reserved):
            return f"overlaps {what}"
    return None


def gateway_address(subnet: IPv4Network) -> IPv4Address:
    """The conventional gateway of a subnet: its first host address."""
    if subnet.prefixlen > 30:
        raise ValueError(f"subnet {subnet} is too small for a gateway and a VM (at most /30)")
    return subnet.network_address + 1


def allocate_address(
    subnet: IPv4Network, taken: Iterable[IPv4Address], gateway: IPv4Address | None = None
) -> IPv4Address:
    """The lowest address of the subnet that is not the network, broadcast, gateway or taken."""
    gw = gateway_address(subnet) if gateway is None else gateway
    reserved = {subnet.network_address, subnet.broadcast_address, gw, *taken}
    for address in subnet.hosts():
        if address not in reserved:
            return address
    raise ExhaustedError(f"no free address left in {subnet}")


def mac_address(node: str, vm: str, index: int, taken: Iterable[str] = ()) -> str:
    """A MAC in 52:54:00:xx:xx:xx derived from (node, vm, NIC index), re-hashed past taken ones."""
    used = {mac.lower() for mac in taken}
    for attempt in range(1 << 16):
        seed = f"{node}/{vm}/{index}" + (f"#{attempt}" if attempt else "")
        tail = hashlib.sha256(seed.encode()).digest()[:3]
        mac = MAC_PREFIX + "".join(f":{byte:02x}" for byte in tail)
        if mac not in used:
            return mac
    raise ExhaustedError("no free MAC address left")


def allocate_uplink(pool: IPv4Network, taken: Iterable[IPv4Network]) -> IPv4Network:
    """The first /31 of the pool that overlaps none of the taken uplink networks.

    Sorted spans of taken /31 slots, not a check of every slot against every taken network: that was quadratic,
    and held the event loop 2 s per net.vrf.create at 2,000 VRFs (8 s at 4,000).
    """
    base, last = int(pool.network_address), int(pool.broadcast_address)
    spans = sorted(
        ((max(int(net.network_address), base) - base) // 2, (min(int(net.broadcast_address), last) - base) // 2)
        for net in taken
        if net.overlaps(pool)
    )
    free = 0
    for first, final in spans:
        if first > free:
            break
        free = max(free, final + 1)
    if free >= pool.num_addresses // 2:
        raise ExhaustedError(f"no free /31 uplink network left in {pool}")
    return IPv4Network((base + 2 * free, 31))
