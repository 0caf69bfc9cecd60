"""A VRF in the kernel: its namespace, bridges, the veths into it and its uplink to the node.

Layout of VRF `red` (non-default) on a node:

    node namespace                              namespace edgevm-red
    VM taps --- evh-red (bridge, no IP) --- evp-red <veth> evlink --- evbr-red (gateway IP)
                                                evu-red <veth> evuplink   (/31 uplink, default route)

libvirt can only attach taps to a bridge in the node namespace, so that bridge carries L2 only: no
address, no ARP (else the node would answer ARP for its own addresses, such as a default-VRF gateway
that a VRF with the same subnet also uses), IPv4 forwarding off, IPv6 off, and the node's nft table
neither tracks, delivers nor routes its frames. Everything L3 (gateway, NAT, filtering) happens
inside the VRF namespace, which reaches the node over the uplink. VMs of two VRFs share no bridge
and no routing table, so they cannot reach each other, even with the same subnet. The default VRF
is a bridge `evbr-default` holding the gateway in the node namespace itself.
"""

from edgevm.netplumb import names
from edgevm.netplumb.drivers import netns as ns
from edgevm.netplumb.drivers.links import Links, open_links
from edgevm.netplumb.drivers.values import VrfPlan


def ensure_vrf(vrf: VrfPlan, node_netns: str | None = None) -> list[str]:
    """Makes a VRF exist as planned; returns the changes made (none when it already did)."""
    # ip_forward=1 resets every interface's forwarding flag, so it goes first and on its own.
    changes = ns.ensure_sysctls({"net.ipv4.ip_forward": "1"}, node_netns)
    if vrf.is_default:
        with open_links(node_netns) as node:
            _ensure_gateway_bridge(node, vrf)
        return changes + node.changes
    assert vrf.netns is not None
    if ns.ensure_netns(vrf.netns):
        changes.append(f"created network namespace {vrf.netns}")
    changes += ns.ensure_sysctls(
        {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"},
        vrf.netns,
    )
    with open_links(node_netns) as node, open_links(vrf.netns) as inner:
        _ensure_gateway_bridge(inner, vrf)
        node.ensure_bridge(vrf.host_bridge)
        node.ensure_l2_only(vrf.host_bridge)
        _ensure_pair(node, inner, names.host_port(vrf.name), names.VRF_LINK)
        node.ensure_master(names.host_port(vrf.name), vrf.host_bridge)
        inner.ensure_master(names.VRF_LINK, vrf.bridge)
        uplink = names.uplink(vrf.name)
        _ensure_pair(node, inner, uplink, names.VRF_UPLINK)
        node.ensure_addresses(uplink, [vrf.uplink_node])
        inner.ensure_addresses(names.VRF_UPLINK, [vrf.uplink_vrf])
        for link in (vrf.host_bridge, names.host_port(vrf.name), uplink):
            node.ensure_up(link)
        for link in (names.VRF_LINK, names.VRF_UPLINK):
            inner.ensure_up(link)
        inner.ensure_default_route(vrf.uplink_node.ip, names.VRF_UPLINK)
    bridge_sysctls = ns.ensure_sysctls(ns.l2_only_sysctls(vrf.host_bridge), node_netns)
    return changes + node.changes + inner.changes + bridge_sysctls


def _ensure_pair(node: Links, inner: Links, name: str, peer: str) -> None:
    node.ensure_veth(name, peer, inner.netns)
    if inner.index(peer) is None:
        # The node's end outlived the namespace its peer was in (deleted, or still being torn down by the
        # kernel): it joins nothing, so it is made again with its peer in the namespace there is now.
        node.remove(name)
        node.ensure_veth(name, peer, inner.netns)


def _ensure_gateway_bridge(links: Links, vrf: VrfPlan) -> None:
    links.ensure_bridge(vrf.bridge)
    links.ensure_addresses(vrf.bridge, [vrf.gateway_interface])
    links.ensure_up(vrf.bridge)


def remove_vrf(vrf: VrfPlan, node_netns: str | None = None) -> list[str]:
    """Removes a VRF's namespace and node-side links; VM taps still on its bridge are detached."""
    changes: list[str] = []
    if vrf.netns is not None and ns.remove_netns(vrf.netns):
        changes.append(f"removed network namespace {vrf.netns}")  # takes the veth pairs along
    with open_links(node_netns) as node:
        node.remove(vrf.host_bridge)
        if not vrf.is_default:
            node.remove(names.host_port(vrf.name))
            node.remove(names.uplink(vrf.name))
    return changes + node.changes


def attach_port(vrf: VrfPlan, port: str, node_netns: str | None = None) -> list[str]:
    """Puts a VM's tap (or a veth standing for it) on the VRF's host bridge and brings it up."""
    with open_links(node_netns) as node:
        node.ensure_master(port, vrf.host_bridge)
        node.ensure_up(port)
    return node.changes
