"""A virtual network's VXLAN device: VNI, local underlay address, and one flooding entry per peer node.

Peers are head-end replicated: broadcast and unknown unicast go to every peer through an all-zero
MAC entry in the device's forwarding database (`bridge fdb append 00:00:00:00:00:00 dst <peer>`);
remote MACs are then learned from what comes back.
"""

from collections.abc import Iterable
from ipaddress import IPv4Address

from edgevm.netplumb.drivers.links import Links

FLOOD_MAC = "00:00:00:00:00:00"


def ensure_vxlan(links: Links, name: str, vni: int, local: IPv4Address, port: int, mtu: int) -> bool:
    """Creates the device, or re-creates it when its VNI, local address or port differ; brings it up."""
    msg = links.link(name)
    if msg is not None:
        data = msg.get(("linkinfo", "data"))
        have = None if data is None else (data.get("vxlan_id"), data.get("vxlan_local"), data.get("vxlan_port"))
        if msg.get(("linkinfo", "kind")) == "vxlan" and have == (vni, str(local), port):
            links.ensure_mtu(name, mtu)
            links.ensure_up(name)
            return False
        links.remove(name)
    links.call(
        f"creating vxlan {name}",
        "link",
        "add",
        ifname=name,
        kind="vxlan",
        vxlan_id=vni,
        vxlan_local=str(local),
        vxlan_port=port,
        vxlan_learning=1,
    )
    links.record(f"created vxlan {name} (vni {vni}, local {local})")
    links.ensure_mtu(name, mtu)
    links.ensure_up(name)
    return True


def peers(links: Links, name: str) -> set[IPv4Address]:
    """The peer underlay addresses the device floods to."""
    idx = links.index(name)
    if idx is None:
        return set()
    entries = links.call(f"listing fdb of {name}", "fdb", "dump", ifindex=idx)
    return {
        IPv4Address(e.get("dst"))
        for e in entries
        if e.get("ifindex") == idx and e.get("lladdr") == FLOOD_MAC and e.get("dst")
    }


def ensure_peers(links: Links, name: str, wanted: Iterable[IPv4Address]) -> bool:
    """Makes the device flood to exactly the wanted peers."""
    idx = links.index(name)
    want = set(wanted)
    have = peers(links, name)
    for gone in sorted(have - want):
        links.call(f"removing peer {gone} of {name}", "fdb", "del", ifindex=idx, lladdr=FLOOD_MAC, dst=str(gone))
        links.record(f"removed peer {gone} from {name}")
    for new in sorted(want - have):
        links.call(f"adding peer {new} to {name}", "fdb", "append", ifindex=idx, lladdr=FLOOD_MAC, dst=str(new))
        links.record(f"added peer {new} to {name}")
    return have != want
