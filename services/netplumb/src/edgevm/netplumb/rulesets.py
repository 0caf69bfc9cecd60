"""The `edgevm` nftables tables of the node namespace and of each VRF namespace, from plain rules.

Port mappings are DNATed twice. The node DNATs `host_interface:host_port` to the VRF-side address of
the VRF's /31 uplink, keeping the port; the VRF namespace DNATs `uplink:host_port` to `vm:vm_port`.
The node never routes a VRF subnet, so VRFs may use the same subnet. For the default VRF (the node's
own namespace) the node DNATs straight to the VM.
"""

from collections.abc import Collection, Iterable, Sequence
from ipaddress import IPv4Address

from edgevm.netplumb import names
from edgevm.netplumb.drivers.values import PortMappingRule, VirtualIpRule, VrfPlan
from edgevm.netplumb.errors import ConflictError
from edgevm.netplumb.nftjson import (
    ACCEPT,
    COUNTER,
    DROP,
    MASQUERADE,
    NOTRACK,
    Chain,
    Expr,
    Rule,
    Table,
    ct_in,
    dnat,
    fib_daddr_local,
    match,
    meta,
    payload,
    snat,
)

FAMILY = "inet"
TABLE = "edgevm"
PRIO_RAW, PRIO_MANGLE, PRIO_DSTNAT, PRIO_FILTER, PRIO_SRCNAT = -300, -150, -100, 0, 100

NetnsTables = dict[str | None, Table]
L2_BRIDGES = ("evh-*", "evn-*")  # node-side bridges that only carry frames of VRFs and vnets


def check_port_mappings(rules: Iterable[PortMappingRule]) -> None:
    """Raises ConflictError when two mappings claim one host port, or one VRF's uplink port."""
    on_node: dict[tuple[str, str, int], PortMappingRule] = {}
    in_vrf: dict[tuple[str, str, int], PortMappingRule] = {}
    for rule in rules:
        for proto in rule.protocols:
            key = (proto, rule.host_interface, rule.host_port)
            if key in on_node:
                raise ConflictError(f"{proto} port {rule.host_port} on {rule.host_interface} is mapped twice")
            on_node[key] = rule
            # Inside a VRF only the port is left to tell mappings apart (the node DNATs to one address).
            vrf_key = (rule.vrf, proto, rule.host_port)
            if rule.vrf != names.DEFAULT_VRF and vrf_key in in_vrf:
                other = in_vrf[vrf_key].host_interface
                raise ConflictError(
                    f"{proto} host port {rule.host_port} is already mapped in VRF {rule.vrf!r} "
                    f"(on {other}); a VRF may use a host port on one interface only"
                )
            in_vrf[vrf_key] = rule


def _port_match(rule: PortMappingRule) -> Rule:
    if rule.protocol is None:
        return (match(meta("l4proto"), ["tcp", "udp"]), match(payload("th", "dport"), rule.host_port))
    return (match(payload(rule.protocol, "dport"), rule.host_port),)


def _vnet_rules(vips: Sequence[VirtualIpRule]) -> tuple[list[Rule], list[Rule], list[Rule]]:
    """DNAT, forward and SNAT rules of the virtual IPs of one namespace."""
    dnats: list[Rule] = []
    snats: list[Rule] = []
    outbound: dict[str, set[IPv4Address]] = {}
    for vip in sorted(vips, key=lambda v: (v.vnet, v.virtual_ip)):
        ifname = names.vnet_interface(vip.vnet)
        dnats.append(
            (match(meta("iifname"), ifname), match(payload("ip", "daddr"), vip.virtual_ip), dnat(vip.vm_address))
        )
        snats.append(
            (match(meta("oifname"), ifname), match(payload("ip", "saddr"), vip.vm_address), snat(vip.virtual_ip))
        )
        outbound.setdefault(ifname, set())
        if vip.allow_outbound:
            outbound[ifname].add(vip.vm_address)
    forwards: list[Rule] = [
        (match(meta("oifname"), ifname), match(payload("ip", "saddr"), sorted(allowed)), ACCEPT)
        for ifname, allowed in sorted(outbound.items())
        if allowed
    ]
    forwards += [
        (match(meta("oifname"), "evi-*"), DROP),  # no new connection into a vnet unless allowed above
        (match(meta("iifname"), "evi-*"), DROP),  # a vnet peer never uses us as a router
    ]
    return dnats, forwards, snats


def _track_chain() -> Chain:
    # Any ct expression makes the kernel track connections in this namespace (flowwatch needs it).
    return Chain("track", "filter", "prerouting", PRIO_MANGLE, ((ct_in("state", ["new"]), COUNTER),))


def _stateful_accepts() -> list[Rule]:
    return [(ct_in("state", ["established", "related"]), ACCEPT), (ct_in("status", ["dnat"]), ACCEPT)]


def _per_bridge(action: Expr, patterns: Sequence[str] = L2_BRIDGES) -> tuple[Rule, ...]:
    return tuple((match(meta("iifname"), pattern), action) for pattern in patterns)


def _node_dnats(by_name: dict[str, VrfPlan], port_mappings: Iterable[PortMappingRule]) -> list[Rule]:
    dnats: list[Rule] = []
    for rule in sorted(port_mappings, key=lambda r: (r.host_interface, r.host_port, r.protocol or "")):
        vrf = by_name[rule.vrf]
        target = dnat(rule.vm_address, rule.vm_port) if vrf.is_default else dnat(vrf.uplink_vrf.ip)
        dnats.append((match(meta("iifname"), rule.host_interface), fib_daddr_local(), *_port_match(rule), target))
    return dnats


def node_table(
    vrfs: Sequence[VrfPlan], port_mappings: Iterable[PortMappingRule], virtual_ips: Iterable[VirtualIpRule]
) -> Table:
    """The node namespace's table: host port DNAT, VRF isolation, default-VRF virtual IPs, masquerade."""
    by_name = {vrf.name: vrf for vrf in vrfs}
    default = by_name.get(names.DEFAULT_VRF)
    vip_dnats, vip_forwards, vip_snats = _vnet_rules([vip for vip in virtual_ips if vip.vrf == names.DEFAULT_VRF])
    forwards: list[Rule] = [
        # Frames bridged inside a VRF's or vnet's L2 pass here too when br_netfilter is loaded
        # (in and out are then the bridge itself); anything routed out of those bridges is a leak.
        *((match(meta("iifname"), p), match(meta("oifname"), p, "!="), DROP) for p in L2_BRIDGES),
        *_stateful_accepts(),
        (match(meta("oifname"), "evu-*"), DROP),  # into a VRF only through port mappings
        *vip_forwards,
    ]
    # One rule for every VRF (what comes out of an uplink), not one per VRF: the node's table, rewritten whole by
    # every change of a port mapping, then does not grow with the number of VRFs.
    snats = [*vip_snats, (match(meta("iifname"), "evu-*"), MASQUERADE)]
    if default is not None:
        # The default VRF's subnet is private too: reached from outside only through port mappings.
        forwards.append((match(meta("iifname"), default.bridge, "!="), match(meta("oifname"), default.bridge), DROP))
        subnet = default.subnet
        snats.append((match(payload("ip", "saddr"), subnet), match(payload("ip", "daddr"), subnet, "!="), MASQUERADE))
    chains = (
        # VRF and vnet bridges carry other namespaces' traffic, possibly with overlapping addresses:
        # the node's conntrack must not mix it with its own, nor its own stack receive it.
        Chain("notrack", "filter", "prerouting", PRIO_RAW, _per_bridge(NOTRACK)),
        _track_chain(),
        Chain("dnat", "nat", "prerouting", PRIO_DSTNAT, (*_node_dnats(by_name, port_mappings), *vip_dnats)),
        Chain("input", "filter", "input", PRIO_FILTER, _per_bridge(DROP, (*L2_BRIDGES, "evi-*"))),
        Chain("forward", "filter", "forward", PRIO_FILTER, tuple(forwards)),
        Chain("snat", "nat", "postrouting", PRIO_SRCNAT, tuple(snats)),
    )
    return Table(FAMILY, TABLE, chains)


def vrf_table(vrf: VrfPlan, port_mappings: Iterable[PortMappingRule], virtual_ips: Iterable[VirtualIpRule]) -> Table:
    """A VRF namespace's table: uplink port DNAT to VMs, virtual IP 1:1 NAT, vnet filter, masquerade."""
    uplink = names.VRF_UPLINK
    dnats: list[Rule] = [
        (match(meta("iifname"), uplink), *_port_match(rule), dnat(rule.vm_address, rule.vm_port))
        for rule in sorted(port_mappings, key=lambda r: (r.host_port, r.protocol or ""))
        if rule.vrf == vrf.name
    ]
    vip_dnats, vip_forwards, vip_snats = _vnet_rules([vip for vip in virtual_ips if vip.vrf == vrf.name])
    forwards = (
        *_stateful_accepts(),
        *vip_forwards,
        (match(meta("iifname"), uplink), DROP),  # the node opens connections only through port mappings
    )
    snats = (*vip_snats, (match(meta("oifname"), uplink), MASQUERADE))
    chains = (
        _track_chain(),
        Chain("dnat", "nat", "prerouting", PRIO_DSTNAT, (*dnats, *vip_dnats)),
        Chain("forward", "filter", "forward", PRIO_FILTER, forwards),
        Chain("snat", "nat", "postrouting", PRIO_SRCNAT, snats),
    )
    return Table(FAMILY, TABLE, chains)


def tables(
    vrfs: Sequence[VrfPlan],
    port_mappings: Iterable[PortMappingRule],
    virtual_ips: Iterable[VirtualIpRule],
    only: Collection[str] | None = None,
    node: bool = True,
) -> NetnsTables:
    """Every namespace's table, keyed by VRF namespace name (None: the node namespace).

    `only` names the VRFs whose tables are wanted (None: all), `node` whether the node's is; every rule is
    checked all the same, so a conflict anywhere is found whichever tables are built.
    """
    mappings = list(port_mappings)
    vips = list(virtual_ips)
    check_port_mappings(mappings)
    known = {vrf.name for vrf in vrfs}
    for vrf_name in {rule.vrf for rule in mappings} | {vip.vrf for vip in vips}:
        if vrf_name not in known:
            raise ConflictError(f"VRF {vrf_name!r} is not planned on this node")
    result: NetnsTables = {None: node_table(vrfs, mappings, vips)} if node else {}
    for vrf in vrfs:
        if not vrf.is_default and (only is None or vrf.name in only):
            result[vrf.netns] = vrf_table(vrf, mappings, vips)
    return result
