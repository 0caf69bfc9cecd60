"""The active flows of one namespace, kept from conntrack events and dumps, and what they look like as Flows."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from hashlib import blake2b as _blake2b

from edgevm.flowwatch.drivers.ctparse import CtEntry, CtKind, CtTuple
from edgevm.shared.objects import Flow

__all__ = ["CLOSING_TCP_STATES", "ActiveFlow", "Changes", "NamespaceFlows", "flow_id", "flow_key", "rfc3339"]

# TCP_CONNTRACK_* of include/uapi/linux/netfilter/nf_conntrack_tcp.h, named as `conntrack -L` prints them.
TCP_STATES = (
    "NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE",
    "SYN_SENT2",
)
# The connection is over though conntrack keeps the entry (TIME_WAIT lasts 120 s by default).
CLOSING_TCP_STATES = frozenset((7, 8))
PROTOCOLS = {
    socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", socket.IPPROTO_ICMP: "icmp",
    socket.IPPROTO_ICMPV6: "icmpv6", socket.IPPROTO_SCTP: "sctp",
}
_DESTROY, _UPDATE = CtKind.DESTROY, CtKind.UPDATE


def flow_id(netns: str, ct_id: int | None, orig: CtTuple, outbound: bool, start_ns: int) -> str:
    """A flow's id: its start in ms as 11 hex digits (so ids sort by start), then a hash of where it lives and
    what it is: the namespace, the conntrack id, the original tuple and the side (a flow between two VMs is one
    flow of each), so equal tuples in two namespaces, or one tuple reused, never share an id.
    """
    key = flow_key(netns, ct_id, orig, outbound)
    return f"{start_ns // 1_000_000:011x}{_blake2b(key.encode(), digest_size=8).hexdigest()}"


def flow_key(netns: str, ct_id: int | None, orig: CtTuple, outbound: bool) -> str:
    """What tells a flow from every other live one: namespace, conntrack id, original tuple, side."""
    return f"{netns}|{ct_id}|{orig.proto}|{orig.src}|{orig.sport}|{orig.dst}|{orig.dport}|{orig.icmp_id}|{outbound}"


_seconds_text: dict[int, str] = {}


def rfc3339(ns: int) -> str:
    """An RFC 3339 UTC time with milliseconds from ns since the epoch (flows started together share a second)."""
    seconds, rest = divmod(ns, 1_000_000_000)
    head = _seconds_text.get(seconds)
    if head is None:
        if len(_seconds_text) >= 4096:
            _seconds_text.clear()
        head = _seconds_text[seconds] = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{head}.{rest // 1_000_000:03d}Z"


class ActiveFlow:
    """A live flow of one VM: the latest conntrack entry seen of it (with counters when one had them), its side.

    It keeps the parser's entry rather than copies of its fields, and makes its id only when asked (then
    keeps it): a resync of 20,000 entries builds 20,000 of these, and a node may hold 100,000s. With its
    entry, tuples, table slot and id one takes about 850 bytes (tests/bench/bench_flowwatch.py measures it).
    """

    __slots__ = ("_id", "entry", "netns", "outbound", "start_ns", "tcp_state", "vm")

    def __init__(
        self, vm: str, outbound: bool, entry: CtEntry, netns: str, start_ns: int, flow_id: str | None = None
    ) -> None:
        self.vm = vm
        self.outbound = outbound
        self.entry = entry
        self.netns = netns
        self.start_ns = start_ns
        self.tcp_state = entry.tcp_state
        self._id = flow_id  # given for a flow a previous run announced; else made when first asked

    @property
    def id(self) -> str:
        """The flow's id (see flow_id)."""
        if self._id is None:
            entry = self.entry
            self._id = flow_id(self.netns, entry.id, entry.orig, self.outbound, self.start_ns)
        return self._id

    @property
    def orig(self) -> CtTuple:
        """The conntrack entry's original tuple: the table's key."""
        return self.entry.orig

    @property
    def reply(self) -> CtTuple:
        """The conntrack entry's reply tuple."""
        return self.entry.reply

    @property
    def family(self) -> int:
        """AF_INET or AF_INET6."""
        return self.entry.family

    def same_connection(self, entry: CtEntry) -> bool:
        """True unless entry is another connection on the same tuple (its conntrack id differs)."""
        return entry.id is None or self.entry.id is None or entry.id == self.entry.id

    def count(self, entry: CtEntry) -> bool:
        """Take the counters and state an entry of this flow carries (events carry counters on DESTROY only);
        False, taking nothing, if the entry is of another connection that reused the tuple."""
        if entry.id != self.entry.id and entry.id is not None and self.entry.id is not None:
            return False
        if entry.orig_bytes is not None:
            self.entry = entry
        if entry.tcp_state is not None:
            self.tcp_state = entry.tcp_state
        return True

    def as_entry(self) -> CtEntry:
        """The conntrack entry to delete or look up for this flow."""
        return self.entry

    def to_flow(self, node: str, status: str, ended_ns: int | None = None) -> Flow:
        """The protocol's Flow: src is the end that opened it, dst the one that answered (the VM's own
        address when the VM answered through a DNAT); in and out are seen from the VM."""
        e = self.entry
        o = e.orig
        sent = (e.orig_bytes or 0, e.orig_packets or 0)
        answered = (e.reply_bytes or 0, e.reply_packets or 0)
        if self.outbound:
            dst_ip, dst_port = o.dst, o.dport
            (bytes_out, packets_out), (bytes_in, packets_in) = sent, answered
        else:
            dst_ip, dst_port = e.reply.src, e.reply.sport
            (bytes_in, packets_in), (bytes_out, packets_out) = sent, answered
        state = self.tcp_state
        return Flow(
            id=self.id,
            node=node,
            vm=self.vm,
            protocol=PROTOCOLS.get(o.proto, str(o.proto)),
            src_ip=o.src,
            src_port=o.sport or 0,
            dst_ip=dst_ip,
            dst_port=dst_port or 0,
            direction="outbound" if self.outbound else "inbound",
            status=status,  # type: ignore[arg-type]
            started_at=rfc3339(self.start_ns),
            state=TCP_STATES[state] if state is not None and state < len(TCP_STATES) else None,
            ended_at=rfc3339(ended_ns) if ended_ns is not None else None,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            packets_in=packets_in,
            packets_out=packets_out,
        )


class Changes:
    """What applying entries did: flows that opened, ended (with their end time), or are closing; and the keys
    of flows a previous run announced that the kernel no longer has (they ended while nobody watched)."""

    __slots__ = ("closed", "closing", "forgotten", "opened")

    def __init__(self) -> None:
        self.opened: list[ActiveFlow] = []
        self.closed: list[tuple[ActiveFlow, int]] = []
        self.closing: list[ActiveFlow] = []  # TCP over but the entry stays: fetch its counters, then close it
        self.forgotten: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.opened or self.closed or self.closing or self.forgotten)


class NamespaceFlows:
    """The active flows of one namespace, keyed by the conntrack entry's original tuple.

    A flow belongs to the VM that opened it (an original source address of the VM: outbound) and to the VM
    that answered it (a reply source, which is the VM's own address behind a DNAT, or an original destination:
    inbound). A flow between two VMs is a flow of each, so there is one table per side.
    """

    def __init__(self, netns: str, addresses: dict[str, str]) -> None:
        self.netns = netns  # what ids are derived from: the namespace's name, "" for the node's own
        self.addresses = addresses
        self.outbound: dict[CtTuple, ActiveFlow] = {}
        self.inbound: dict[CtTuple, ActiveFlow] = {}
        # entries of flows being terminated: no new flow from them until the cut ends (`release`), not even
        # from an entry the kernel makes again (an ICMP echo) after the DESTROY that the termination caused
        self.ignored: set[CtTuple] = set()
        # flow_key -> (id, start) of flows a previous run had announced: the first resync gives them their ids
        # back (and does not announce them again); those it does not find are reported in Changes.forgotten
        self.remembered: dict[str, tuple[str, int]] = {}

    def __len__(self) -> int:
        return len(self.outbound) + len(self.inbound)

    def flows(self) -> Iterable[ActiveFlow]:
        """Every active flow."""
        yield from self.outbound.values()
        yield from self.inbound.values()

    def apply(self, entries: list[CtEntry], changes: Changes, now_ns: int | None = None) -> None:
        """Apply a batch of conntrack events in order."""
        outbound, inbound, addresses = self.outbound, self.inbound, self.addresses
        opened, closed, closing = changes.opened, changes.closed, changes.closing
        now_ns = now_ns or time.time_ns()
        for entry in entries:
            key = entry.orig
            if entry.kind is _DESTROY:
                end = entry.stop or now_ns
                flow = outbound.pop(key, None)
                if flow is not None:
                    flow.count(entry)
                    closed.append((flow, end))
                flow = inbound.pop(key, None)
                if flow is not None:
                    flow.count(entry)
                    closed.append((flow, end))
                continue
            out_flow = outbound.get(key)
            in_flow = inbound.get(key)
            if out_flow is not None or in_flow is not None:
                if entry.tcp_state in CLOSING_TCP_STATES:
                    for table, flow in ((outbound, out_flow), (inbound, in_flow)):
                        if flow is not None:
                            del table[key]
                            flow.count(entry)
                            closing.append(flow)
                elif entry.tcp_state is not None:
                    for flow in (out_flow, in_flow):
                        if flow is not None:
                            flow.tcp_state = entry.tcp_state
                continue
            if entry.tcp_state in CLOSING_TCP_STATES:
                continue  # over before we knew it (or already recorded): not a new flow
            if not addresses or (self.ignored and key in self.ignored):
                continue
            vm = addresses.get(key.src)
            start = entry.start or now_ns
            if vm is not None:
                flow = outbound[key] = ActiveFlow(vm, True, entry, self.netns, start)
                opened.append(flow)
            vm = addresses.get(entry.reply.src) or addresses.get(key.dst)
            if vm is not None:
                flow = inbound[key] = ActiveFlow(vm, False, entry, self.netns, start)
                opened.append(flow)

    def resync(
        self, entries: list[CtEntry], changes: Changes, now_ns: int | None = None, keep_absent: bool = False
    ) -> None:
        """Make the table what a full dump says: new flows opened, counters taken, flows gone from it ended.

        keep_absent (a resync for changed addresses, with no event lost): a flow missing from the dump is
        kept, since its DESTROY is on its way and brings its final counters.
        """
        now_ns = now_ns or time.time_ns()
        old_out, old_in, ignored = self.outbound, self.inbound, self.ignored
        if not (old_out or old_in or ignored):
            self._first_resync(entries, changes, now_ns)
            return
        out: dict[CtTuple, ActiveFlow] = {}
        inb: dict[CtTuple, ActiveFlow] = {}
        addresses, netns = self.addresses, self.netns
        opened, closed, closing_flows = changes.opened, changes.closed, changes.closing
        for entry in entries:
            key = entry.orig
            if ignored and key in ignored:
                continue
            closing = entry.tcp_state in CLOSING_TCP_STATES
            # the two sides, written out: this loop runs for every entry of every resync of a full table
            vm = addresses.get(key.src)
            flow = old_out.pop(key, None)
            if flow is not None and (flow.vm != vm or not flow.count(entry)):
                closed.append((flow, now_ns))  # the address changed hands, or the tuple is another connection's
                flow = None
            if flow is not None:
                if closing:
                    closing_flows.append(flow)
                else:
                    out[key] = flow
            elif vm is not None and not closing:
                flow = out[key] = ActiveFlow(vm, True, entry, netns, entry.start or now_ns)
                opened.append(flow)
            vm = addresses.get(entry.reply.src) or addresses.get(key.dst)
            flow = old_in.pop(key, None)
            if flow is not None and (flow.vm != vm or not flow.count(entry)):
                closed.append((flow, now_ns))
                flow = None
            if flow is not None:
                if closing:
                    closing_flows.append(flow)
                else:
                    inb[key] = flow
            elif vm is not None and not closing:
                flow = inb[key] = ActiveFlow(vm, False, entry, netns, entry.start or now_ns)
                opened.append(flow)
        if keep_absent:
            for old, new in ((old_out, out), (old_in, inb)):
                for key, flow in old.items():
                    new.setdefault(key, flow)
        else:
            for flow in self.flows():  # not in the dump: ended while events were lost
                closed.append((flow, now_ns))
        self.outbound, self.inbound = out, inb

    def _first_resync(self, entries: list[CtEntry], changes: Changes, now_ns: int) -> None:
        """The start-up dump into an empty table: every entry of a VM is a flow, announced unless remembered."""
        out, inb = self.outbound, self.inbound
        addresses, netns, remembered = self.addresses, self.netns, self.remembered
        if remembered:
            for entry in entries:
                closing = entry.tcp_state in CLOSING_TCP_STATES
                vm = addresses.get(entry.orig.src)
                if vm is not None:
                    self._resume(vm, True, entry, closing, changes, now_ns)
                vm = addresses.get(entry.reply.src) or addresses.get(entry.orig.dst)
                if vm is not None:
                    self._resume(vm, False, entry, closing, changes, now_ns)
            changes.forgotten.extend(remembered)
            self.remembered = {}
            return
        opened = changes.opened
        new_flow, closing_states, get = ActiveFlow, CLOSING_TCP_STATES, addresses.get
        for entry in entries:  # the hot loop of a start-up: 20,000 entries in a few ms
            if entry.tcp_state in closing_states:
                continue
            key = entry.orig
            start = entry.start or now_ns
            vm = get(key.src)
            if vm is not None:
                flow = out[key] = new_flow(vm, True, entry, netns, start)
                opened.append(flow)
            vm = get(entry.reply.src) or get(key.dst)
            if vm is not None:
                flow = inb[key] = new_flow(vm, False, entry, netns, start)
                opened.append(flow)

    def _resume(
        self, vm: str, outbound: bool, entry: CtEntry, closing: bool, changes: Changes, now_ns: int
    ) -> None:
        """A flow of the first dump when a previous run left flows: its own again if it is one of them."""
        known = self.remembered.pop(flow_key(self.netns, entry.id, entry.orig, outbound), None)
        if known is None:
            if not closing:
                flow = ActiveFlow(vm, outbound, entry, self.netns, entry.start or now_ns)
                (self.outbound if outbound else self.inbound)[entry.orig] = flow
                changes.opened.append(flow)
            return
        flow_id, start_ns = known
        flow = ActiveFlow(vm, outbound, entry, self.netns, start_ns, flow_id)
        if closing:
            changes.closing.append(flow)  # over while nobody watched: its counters are read, then it closes
        else:
            (self.outbound if outbound else self.inbound)[entry.orig] = flow

    def find(self, flow_id: str) -> ActiveFlow | None:
        """The active flow with this id: a scan of the flows that started in the id's millisecond, whose id
        alone is made (terminate is rare; making every flow's id would keep 100,000s of strings)."""
        try:
            start_ms = int(flow_id[:11], 16)
        except ValueError:
            return None
        for flow in self.flows():
            if flow.start_ns // 1_000_000 == start_ms and flow.id == flow_id:
                return flow
        return None

    def remove(self, flow: ActiveFlow) -> bool:
        """Take a flow out of the table (it ended); False if it was not there (ended or taken already)."""
        table = self.outbound if flow.outbound else self.inbound
        if table.get(flow.orig) is flow:
            del table[flow.orig]
            return True
        return False

    def clear(self) -> list[ActiveFlow]:
        """Empty the table (the namespace is gone); the flows it held."""
        flows = list(self.flows())
        self.outbound, self.inbound = {}, {}
        return flows

    def take(self, flow: ActiveFlow) -> None:
        """Take a flow out to terminate it: until `release`, its entry opens no new flow."""
        table = self.outbound if flow.outbound else self.inbound
        if table.get(flow.orig) is flow:
            del table[flow.orig]
        self.ignored.add(flow.orig)

    def release(self, flow: ActiveFlow, restore: bool) -> None:
        """Done with a taken flow: put it back (its termination failed) or let its entry be seen again."""
        self.ignored.discard(flow.orig)
        if restore:
            (self.outbound if flow.outbound else self.inbound).setdefault(flow.orig, flow)
