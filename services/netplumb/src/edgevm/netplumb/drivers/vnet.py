"""A virtual network on a node: an L2 bridge joining its VXLAN device and one veth per attached VRF.

    node namespace                                       VRF namespace (node's own for default)
    evx-<vnet> (vxlan) --- evn-<vnet> (bridge, no IP) --- eva<hash> <veth> evi-<vnet> (virtual IPs)

The bridge is L2 only, like a VRF's host bridge. The VRF side holds the virtual IPs of its VMs on the
network's prefix, so it answers ARP for them; its nft table does the 1:1 NAT to the VMs.
"""

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Interface

from edgevm.netplumb import names
from edgevm.netplumb.drivers import netns as ns
from edgevm.netplumb.drivers.links import open_links
from edgevm.netplumb.drivers.values import VnetPlan, VrfPlan
from edgevm.netplumb.drivers.vxlan import ensure_peers, ensure_vxlan


def ensure_vnet(vnet: VnetPlan, node_netns: str | None = None) -> list[str]:
    """Makes the network's bridge and VXLAN device exist with exactly its peers."""
    with open_links(node_netns) as node:
        node.ensure_bridge(vnet.bridge)
        node.ensure_l2_only(vnet.bridge)
        ensure_vxlan(node, vnet.vxlan, vnet.vni, vnet.local, vnet.port, vnet.mtu)
        node.ensure_master(vnet.vxlan, vnet.bridge)
        ensure_peers(node, vnet.vxlan, vnet.peers)
        node.ensure_up(vnet.bridge)
    return node.changes + ns.ensure_sysctls(ns.l2_only_sysctls(vnet.bridge), node_netns)


def remove_vnet(vnet: VnetPlan, node_netns: str | None = None) -> list[str]:
    """Removes the network's VXLAN device and bridge (attachments are removed on their own)."""
    with open_links(node_netns) as node:
        node.remove(vnet.vxlan)
        node.remove(vnet.bridge)
    return node.changes


def ensure_attachment(
    vnet: VnetPlan, vrf: VrfPlan, virtual_ips: Iterable[IPv4Address], node_netns: str | None = None
) -> list[str]:
    """Joins a VRF to the network, its side holding exactly the given virtual IPs."""
    port = names.vnet_port(vrf.name, vnet.name)
    inner_netns = vrf.netns if vrf.netns is not None else node_netns
    wanted = [IPv4Interface(f"{ip}/{vnet.cidr.prefixlen}") for ip in virtual_ips]
    with open_links(node_netns) as node:
        node.ensure_veth(port, vnet.interface, inner_netns)
        node.ensure_master(port, vnet.bridge)
        node.ensure_mtu(port, vnet.mtu)
        node.ensure_up(port)
        changes = node.changes
        with open_links(inner_netns) as inner:
            inner.ensure_mtu(vnet.interface, vnet.mtu)
            inner.ensure_addresses(vnet.interface, wanted)
            inner.ensure_up(vnet.interface)
    return changes + inner.changes


def remove_attachment(vnet: VnetPlan, vrf: VrfPlan, node_netns: str | None = None) -> list[str]:
    """Detaches a VRF from the network (deleting the veth removes both ends)."""
    with open_links(node_netns) as node:
        node.remove(names.vnet_port(vrf.name, vnet.name))
    return node.changes
