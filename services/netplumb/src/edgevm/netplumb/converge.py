"""Converging: the kernel of one node brought to a Desired state (the Plumber), and what the kernel has.

Every method blocks (netlink, nft, tc, sysctl): the service runs them one at a time on its own worker
thread, so two changes never interleave. The plumber remembers what it applied in this process, so a
change (a VM started) touches only what differs; `verify` reads everything back from the kernel instead,
which is what a reconcile does after a restart or on its timer.

A converge has a Scope: the VRFs it looks at (their namespace, bridges, attachments and nft table) and
whether it looks at the node's own parts (its table, virtual networks, VM taps and wires). A VM's change
is scoped to its VRF and the node, so its cost does not grow with the number of VRFs on the node.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from ipaddress import IPv4Address

from edgevm.netplumb import names
from edgevm.netplumb.desired import Desired
from edgevm.netplumb.drivers import netns as ns
from edgevm.netplumb.drivers import nft
from edgevm.netplumb.drivers.links import links_session, open_links
from edgevm.netplumb.drivers.values import VirtualInterfacePlan, VnetPlan, VrfPlan
from edgevm.netplumb.drivers.vif import ensure_virtual_interface, remove_virtual_interface
from edgevm.netplumb.drivers.vnet import ensure_attachment, ensure_vnet, remove_attachment, remove_vnet
from edgevm.netplumb.drivers.vrf import ensure_vrf, remove_vrf
from edgevm.netplumb.errors import KernelError, NetplumbError
from edgevm.netplumb.nftjson import Table
from edgevm.netplumb.rulesets import NetnsTables, tables
from edgevm.shared.netstate import NetFailure, NetStep

log = logging.getLogger(__name__)

# Node-side links netplumb names: VRF host bridges, their ports and uplinks, vnet bridges, VXLANs, ports.
_OWN_PREFIXES = ("evh-", "evp-", "evu-", "evn-", "evx-")
_VNET_PORT_LEN = len(names.vnet_port("vrf", "vnet"))  # "eva" and a hash


INTERNAL = "an internal error (the node's log has the details)"


@dataclass(frozen=True)
class Scope:
    """What a converge looks at: the named VRFs (None: every one) and, with `node`, the node's own parts."""

    vrfs: frozenset[str] | None = None
    node: bool = True

    def has(self, vrf: str) -> bool:
        """Whether a VRF is in this scope."""
        return self.vrfs is None or vrf in self.vrfs


EVERYTHING = Scope()


def vrf_scope(*vrfs: str | None) -> Scope:
    """A change of these VRFs (and of the node's own parts)."""
    return Scope(vrfs=frozenset(vrf for vrf in vrfs if vrf is not None))


@dataclass
class Outcome:
    """What a converge changed (each a sentence), the steps it could not do, and the namespaces it looked at."""

    changes: list[str] = field(default_factory=list)
    failures: list[NetFailure] = field(default_factory=list)
    namespaces: set[str | None] = field(default_factory=set)  # looked at: compared, read or changed

    def attempt(self, step: NetStep, what: str, action: Callable[[], list[str]], **names: str) -> bool:
        """Runs one step and says whether it worked; a kernel failure is noted and the next steps still run.

        `names` say what the step is for (`vrf`, `network`, `interface`), as NetFailure holds them.
        """
        try:
            self.changes += action()
        except NetplumbError as exc:
            log.warning("%s failed: %s", what, exc)
            self.failures.append(NetFailure(step=step, what=what, error=str(exc), **names))
            return False
        except Exception:
            # A converge never stops half-way: the steps after this one, and the caller's undo, still run.
            log.exception("%s failed unexpectedly", what)
            self.failures.append(NetFailure(step=step, what=what, error=INTERNAL, **names))
            return False
        return True


def _is_vnet_port(name: str) -> bool:
    return len(name) == _VNET_PORT_LEN and name.startswith("eva") and all(c in "0123456789abcdef" for c in name[3:])


class Plumber:
    """Applies Desired states to one node's namespace (None: this process's own) and its VRF namespaces."""

    def __init__(self, node_netns: str | None, netns_prefix: str) -> None:
        self.node_netns = node_netns
        self.netns_prefix = netns_prefix
        self._vrfs: dict[str, VrfPlan] = {}
        self._vnets: dict[str, VnetPlan] = {}
        self._attachments: dict[tuple[str, str], tuple[IPv4Address, ...]] = {}
        self._taps: set[tuple[str, str]] = set()
        self._wires: set[VirtualInterfacePlan] = set()
        self._tables: dict[str | None, Table] = {}
        self._built: tuple[tuple[Desired, Scope], NetnsTables] | None = None  # the tables last built

    def converge(self, want: Desired, verify: bool = False, scope: Scope = EVERYTHING) -> Outcome:
        """Makes the kernel hold `want` within `scope`; with `verify`, checks every piece there and removes what
        nothing needs."""
        with links_session() as opened:  # one netlink socket per namespace, and one read of it while nothing changes
            out = self._converge(want, verify, scope)
            out.namespaces.update(opened)
            return out

    def _converge(self, want: Desired, verify: bool, scope: Scope) -> Outcome:
        out = Outcome()
        node = self.node_netns
        if verify and scope.node:
            out.attempt("links", "removing unused links", lambda: self._remove_orphans(want))
        for vrf in want.vrfs:
            if not scope.has(vrf.name):
                continue
            if (verify or self._vrfs.get(vrf.name) != vrf) and out.attempt(
                "vrf", f"VRF {vrf.name}", partial(ensure_vrf, vrf, node), vrf=vrf.name
            ):
                self._vrfs[vrf.name] = vrf
        vnets = {vnet.name: vnet for vnet in want.vnets}
        for vnet in want.vnets if scope.node else ():
            if (verify or self._vnets.get(vnet.name) != vnet) and out.attempt(
                "vnet", f"virtual network {vnet.name}", partial(ensure_vnet, vnet, node), network=vnet.name
            ):
                self._vnets[vnet.name] = vnet
        self._attach(want, verify, scope, vnets, out)
        if scope.node:
            out.attempt("taps", "attaching VM taps", lambda: self._attach_taps(want, verify))
        self._apply_tables(want, verify, scope, out)
        if scope.node:
            self._wire(want, verify, out)
        return out

    def _attach(self, want: Desired, verify: bool, scope: Scope, vnets: dict[str, VnetPlan], out: Outcome) -> None:
        node = self.node_netns
        vrfs = {vrf.name: vrf for vrf in want.vrfs}
        for key in sorted(set(self._attachments) - set(want.attachments)):
            vnet_name, vrf_name = key
            if vnet_name in self._vnets and vrf_name in self._vrfs:
                gone = partial(remove_attachment, self._vnets[vnet_name], self._vrfs[vrf_name], node)
                out.attempt("detach", f"detaching {vrf_name} from {vnet_name}", gone, vrf=vrf_name, network=vnet_name)
            del self._attachments[key]
        for key, ips in want.attachments.items():
            if not scope.has(key[1]) or key[0] not in vnets or key[1] not in vrfs:
                continue
            if verify or self._attachments.get(key) != ips:
                attach = partial(ensure_attachment, vnets[key[0]], vrfs[key[1]], ips, node)
                if out.attempt("attach", f"attaching {key[1]} to {key[0]}", attach, vrf=key[1], network=key[0]):
                    self._attachments[key] = ips

    def _attach_taps(self, want: Desired, verify: bool) -> list[str]:
        todo = [tb for tb in want.taps if verify or tb not in self._taps]
        changes: list[str] = []
        if todo:
            with open_links(self.node_netns) as node:
                if verify:  # every link is read anyway
                    present = node.names(fresh=False)
                else:  # its own few, each looked up: pyroute2 takes most of a second to dump hundreds of VRFs' links
                    present = {name for pair in todo for name in pair if node.index(name) is not None}
                for tap, bridge in todo:
                    # libvirt puts the tap on the bridge itself; this repairs one left off it (or a test's veth).
                    if tap in present and bridge in present:
                        node.ensure_master(tap, bridge)
                        node.ensure_up(tap)
            changes = node.changes
        self._taps = set(want.taps)  # only once all went well: a failure is tried again next time
        return changes

    def _apply_tables(self, want: Desired, verify: bool, scope: Scope, out: Outcome) -> None:
        try:
            wanted = self._tables_of(want, scope)
        except NetplumbError as exc:
            out.failures.append(NetFailure(step="tables", what="building the nftables tables", error=str(exc)))
            return
        # VRF namespaces first: the node's DNAT to a VRF must find the VRF's own rules in place.
        order = sorted(wanted, key=lambda n: (n is None, n or ""))
        todo = [netns for netns in order if verify or self._tables.get(netns) != wanted[netns]]
        targets = [(wanted[netns], self.node_netns if netns is None else netns) for netns in todo]
        # With `verify` every table is read back (all at once) and applied only where the kernel differs.
        try:
            results = nft.ensure_tables(targets) if verify else [self._apply(t, target) for t, target in targets]
        except Exception:
            log.exception("nftables tables failed unexpectedly")
            out.failures.append(NetFailure(step="tables", what="nftables tables", error=INTERNAL))
            return
        out.namespaces.update(self.node_netns if netns is None else netns for netns in wanted)
        for netns, (table, target), result in zip(todo, targets, results, strict=True):
            if isinstance(result, KernelError):
                log.warning("nftables table of %s failed: %s", netns or "the node", result)
                what = f"nftables table of {netns or 'the node'}"
                out.failures.append(NetFailure(step="tables", what=what, error=str(result)))
                continue
            self._tables[netns] = table
            if result:
                out.changes.append(f"{target or 'node'}: replaced table {table.family} {table.name}")
        planned = {None, *(vrf.netns for vrf in want.vrfs)}
        for netns in set(self._tables) - planned:
            del self._tables[netns]

    def _tables_of(self, want: Desired, scope: Scope) -> NetnsTables:
        # Building the tables of 100 VMs takes milliseconds; a reconcile mostly sees the Desired of last time.
        if self._built is None or self._built[0] != (want, scope):
            built = tables(want.vrfs, want.port_mappings, want.virtual_ips, scope.vrfs, scope.node)
            self._built = ((want, scope), built)
        return self._built[1]

    @staticmethod
    def _apply(table: Table, netns: str | None) -> bool | KernelError:
        try:
            nft.apply_table(table, netns)
        except KernelError as exc:
            return exc
        return True

    def _wire(self, want: Desired, verify: bool, out: Outcome) -> None:
        node = self.node_netns
        unwire = set(want.idle_interfaces) if verify else self._wires - set(want.virtual_interfaces)
        for plan in sorted(unwire, key=lambda p: p.host_interface):
            unwire_one = partial(remove_virtual_interface, plan, node)
            out.attempt("unwire", f"unwiring {plan.host_interface}", unwire_one, interface=plan.host_interface)
        wired: set[VirtualInterfacePlan] = set()
        for plan in want.virtual_interfaces:
            wire = partial(ensure_virtual_interface, plan, node)
            if verify or plan not in self._wires:
                if not out.attempt("vif", f"virtual interface {plan.host_interface}", wire,
                                   interface=plan.host_interface):
                    continue
            wired.add(plan)
        self._wires = wired

    def _remove_orphans(self, want: Desired) -> list[str]:
        """Removes VRF namespaces, links and vnet ports of this node that no record names."""
        vrf_names = {vrf.name for vrf in want.vrfs}
        keep = {vrf.host_bridge for vrf in want.vrfs}
        for vrf in want.vrfs:
            if not vrf.is_default:
                keep |= {names.host_port(vrf.name), names.uplink(vrf.name)}
        for vnet in want.vnets:
            keep |= {vnet.bridge, vnet.vxlan}
        keep |= {names.vnet_port(vrf, vnet) for vnet, vrf in want.attachments}
        changes: list[str] = []
        with open_links(self.node_netns) as node:
            links = node.names()
            # A namespace is an unused VRF's only when the node still has that VRF's uplink: a bare prefix
            # match could hit namespaces that are not this node's.
            for entry in sorted(os.listdir(ns.NETNS_DIR)) if os.path.isdir(ns.NETNS_DIR) else []:
                vrf = entry[len(self.netns_prefix) :]
                if entry.startswith(self.netns_prefix) and vrf not in vrf_names and names.uplink(vrf) in links:
                    if ns.remove_netns(entry):
                        changes.append(f"removed unused VRF namespace {entry}")
            for name in links:
                if name not in keep and (name.startswith(_OWN_PREFIXES) or _is_vnet_port(name)):
                    node.remove(name)
        return changes + node.changes

    def remove_vrf(self, vrf: VrfPlan) -> list[str]:
        """Removes a VRF from the kernel (its namespace, bridges and uplink)."""
        self._vrfs.pop(vrf.name, None)
        self._tables.pop(vrf.netns, None)
        return remove_vrf(vrf, self.node_netns)

    def remove_vnet(self, vnet: VnetPlan) -> list[str]:
        """Removes a virtual network's bridge and VXLAN device."""
        self._vnets.pop(vnet.name, None)
        return remove_vnet(vnet, self.node_netns)

    def existing_interfaces(self, wanted: set[str]) -> set[str]:
        """Which of the named links the node namespace has (each looked up: a dump of every link costs pyroute2
        about 0.7 ms a link, and a node has three per VRF)."""
        with open_links(self.node_netns) as node:
            return {name for name in wanted if node.index(name) is not None}

    def underlay_address(self, peers: list[str]) -> IPv4Address | None:
        """The address this node reaches the first peer from, else its first global IPv4 address."""
        with open_links(self.node_netns) as node:
            for peer in peers:
                try:
                    routes = node.call(f"looking up the route to {peer}", "route", "get", dst=peer)
                except KernelError:
                    continue
                source = routes[0].get("prefsrc") if routes else None
                if source:
                    return IPv4Address(source)
            links = node.call("listing links", "link", "dump")
            ours = {m["index"] for m in links if m.get("ifname", "").startswith("ev")}
            for msg in node.call("listing addresses", "addr", "dump", family=socket.AF_INET):
                if msg.get("scope") == 0 and msg["index"] not in ours:
                    return IPv4Address(msg.get("address"))
        return None
