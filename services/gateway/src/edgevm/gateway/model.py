"""The fleet read model: nodes, VMs, recent tasks and flows of every node, built from events."""

from __future__ import annotations

import bisect
import heapq
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

import msgspec

from edgevm.shared.commands import GwFlow, GwTask, GwVm, NodeInfo, NodeState
from edgevm.shared.events import (
    AnyEvent,
    FlowEvent,
    Heartbeat,
    TaskUpdated,
    VmDeleted,
    VmEvent,
    decode_event,
)
from edgevm.shared.objects import Flow, Task, Vm

# Heartbeats come every 10 s from each service: a node is `unreachable` after 3 missed (EDGEVM_GW_NODE_TIMEOUT).
NODE_TIMEOUT = 30.0
# Recent tasks and flows kept per node (the least recently changed go first): one busy node cannot push
# another's history out. task.list and flow.list return at most 500.
MAX_TASKS_PER_NODE = 1_000
MAX_FLOWS_PER_NODE = 1_000
T = TypeVar("T")
_encoder = msgspec.json.Encoder()


def parse_time(at: str) -> float | None:
    """Return an RFC 3339 time as seconds since the epoch, None when it is not one."""
    try:
        return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass
class NodeRecord:
    """What the gateway knows of one node; deadlines are on the gateway's monotonic clock."""

    last_seen: str = ""
    last_seen_at: float = 0.0  # last_seen as epoch seconds
    alive_until: float = float("-inf")
    services: dict[str, float] = field(default_factory=dict)  # service -> alive until
    cpus: int = 0
    memory_bytes: int = 0
    events: int = 0
    last_lag: float = 0.0  # seconds between the newest event's `at` and its ingest
    vms: dict[str, Vm] = field(default_factory=dict)
    # The node's gw.vm.list entries, encoded for the node's state `rows_state`: each VM's, and all of them
    # joined (None: a VM changed since).
    rows_state: NodeState | None = None
    vm_rows: dict[str, bytes] = field(default_factory=dict)
    vms_json: bytes | None = None
    tasks: OrderedDict[str, Task] = field(default_factory=OrderedDict)
    flows: OrderedDict[str, Flow] = field(default_factory=OrderedDict)


class FleetModel:
    """Applies events in stream order and answers the gateway's queries from memory.

    Liveness: a heartbeat stamped `at` (the node's clock) and ingested when the gateway's wall clock reads
    `now` keeps its node up for `timeout - max(0, now - at)` more seconds, counted on the gateway's
    monotonic clock. So a replayed old heartbeat (older than the timeout) never makes a node look up, a
    node whose clock runs ahead still goes unreachable `timeout` after its last heartbeat arrived, and a
    node whose clock lags by s seconds goes unreachable s seconds early (nodes are expected to run NTP).
    """

    def __init__(
        self,
        timeout: float = NODE_TIMEOUT,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout = timeout
        self._wall = wall
        self._monotonic = monotonic
        self.nodes: dict[str, NodeRecord] = {}
        self.applied = 0

    def ingest(self, subject: str, data: bytes) -> float | None:
        """Apply the event `data` published on `subject` (`edgevm.evt.<node>.<kind>...`); return its lag in s."""
        return self.apply(subject.split(".", 3)[2], decode_event(data))

    def apply(self, node: str, event: AnyEvent) -> float | None:
        """Apply one event of `node`; return the seconds between its `at` and now (None if `at` is unreadable)."""
        self.applied += 1
        state = self.nodes.get(node)
        if state is None:
            state = self.nodes[node] = NodeRecord()
        state.events += 1
        at = parse_time(event.at)
        lag = None if at is None else self._wall() - at
        if lag is not None:
            state.last_lag = lag
        if isinstance(event, Heartbeat):
            self._heartbeat(state, event, at, lag)
        elif isinstance(event, VmEvent):
            state.vms_json = None
            state.vm_rows.pop(event.vm.spec.name, None)
            if isinstance(event, VmDeleted):
                state.vms.pop(event.vm.spec.name, None)
            else:
                state.vms[event.vm.spec.name] = event.vm
        elif isinstance(event, TaskUpdated):
            _put_bounded(state.tasks, event.task.id, event.task, MAX_TASKS_PER_NODE)
        elif isinstance(event, FlowEvent):
            _put_bounded(state.flows, event.flow.id, event.flow, MAX_FLOWS_PER_NODE)
        return lag

    def _heartbeat(self, state: NodeRecord, event: Heartbeat, at: float | None, lag: float | None) -> None:
        if at is None or lag is None:
            return
        if at > state.last_seen_at:
            state.last_seen, state.last_seen_at = event.at, at
            state.cpus, state.memory_bytes = event.cpus, event.memory_bytes
        remaining = self.timeout - max(0.0, lag)
        if remaining <= 0:
            return  # a replayed old heartbeat: it says when the node was last seen, not that it is up
        until = self._monotonic() + remaining
        state.alive_until = max(state.alive_until, until)
        for service in event.services:
            state.services[service] = max(state.services.get(service, float("-inf")), until)

    def node_state(self, node: str) -> NodeState:
        """Return `up` while a heartbeat of `node` is recent, else `unreachable`."""
        state = self.nodes.get(node)
        return "up" if state is not None and self._monotonic() < state.alive_until else "unreachable"

    def node_list(self) -> list[NodeInfo]:
        """Return every node with its VM count, its live services and whether it is up."""
        clock = self._monotonic()
        nodes = []
        for name in sorted(self.nodes):
            state = self.nodes[name]
            live = sorted(s for s, until in state.services.items() if clock < until)
            up: NodeState = "up" if clock < state.alive_until else "unreachable"
            nodes.append(NodeInfo(name, state.last_seen, len(state.vms), up, live))
        return nodes

    def _selected(self, node: str | None) -> Iterable[tuple[str, NodeRecord, NodeState]]:
        names = sorted(self.nodes) if node is None else [node] if node in self.nodes else []
        for name in names:
            yield name, self.nodes[name], self.node_state(name)

    def vm_list(self, node: str | None) -> list[GwVm]:
        """Return the VMs of one node or of all, ordered by node and name, each with its node's state."""
        return [
            GwVm(name, vm.spec, vm.status, up)
            for name, state, up in self._selected(node)
            for _, vm in sorted(state.vms.items())
        ]

    def vm_list_json(self, node: str | None) -> bytes:
        """Return the JSON of `{"vms": vm_list(node)}`, from each VM's entry encoded once per change.

        The whole fleet's list is megabytes (5,000 VMs: 2.7 MB): encoding it anew for every request cost
        more than the request's budget, and made a garbage collector's work of 5,000 objects each time.
        Entries are kept per VM, not only per node: under a steady stream of events most nodes change
        between two requests, and re-encoding a node's 50 VMs for the one that changed was most of the work.
        """
        chunks = [b'{"vms":[']
        for name, state, up in self._selected(node):
            _current_rows(state, up)
            if state.vms_json is None:
                state.vms_json = b",".join(_vm_row(name, state, up, vm_name) for vm_name in sorted(state.vms))
            if state.vms_json:
                chunks += (state.vms_json, b",")
        if len(chunks) > 1:
            chunks.pop()  # the last separator
        chunks.append(b"]}")
        return b"".join(chunks)

    def vm_rows(self, node: str | None, after: tuple[str, str] | None) -> Iterator[tuple[str, bytes]]:
        """Yield the entries of `vm_list(node)` that sort after `after` (node, name), whether or not that VM
        exists: each with its cursor `<node>/<name>` and its JSON, encoded once per change (as vm_list_json)."""
        for name, state, up in self._selected(node):
            if after is not None and name < after[0]:
                continue
            _current_rows(state, up)
            names = sorted(state.vms)
            start = bisect.bisect_right(names, after[1]) if after is not None and name == after[0] else 0
            for vm_name in names[start:]:
                yield f"{name}/{vm_name}", _vm_row(name, state, up, vm_name)

    def task_list(self, node: str | None, vm: str | None, limit: int) -> list[GwTask]:
        """Return the newest tasks first (ids sort by creation time), filtered by node and VM."""
        rows: list[tuple[Task, NodeState]] = []
        for _, state, up in self._selected(node):
            rows.extend((t, up) for t in state.tasks.values() if vm is None or t.vm == vm)
        newest = heapq.nlargest(limit, rows, key=lambda row: row[0].id)
        return [_extend(GwTask, t, up) for t, up in newest]

    def flow_list(self, node: str | None, vm: str | None, status: str, limit: int) -> list[GwFlow]:
        """Return the newest flows first, filtered by node, VM and status (active, completed or all)."""
        def wanted(f: Flow) -> bool:
            if vm is not None and f.vm != vm:
                return False
            return status == "all" or (f.status == "active") == (status == "active")

        rows: list[tuple[Flow, NodeState]] = []
        for _, state, up in self._selected(node):
            rows.extend((f, up) for f in state.flows.values() if wanted(f))
        newest = heapq.nlargest(limit, rows, key=lambda row: row[0].started_at)
        return [_extend(GwFlow, f, up) for f, up in newest]


def _current_rows(state: NodeRecord, up: NodeState) -> None:
    """Drop a node's encoded gw.vm.list entries when its state changed since: every entry carries it."""
    if state.rows_state != up:
        state.rows_state, state.vms_json = up, None
        state.vm_rows.clear()


def _vm_row(node: str, state: NodeRecord, up: NodeState, vm_name: str) -> bytes:
    """Return the encoded gw.vm.list entry of one VM of `node`, encoding it unless it is kept already."""
    row = state.vm_rows.get(vm_name)
    if row is None:
        vm = state.vms[vm_name]
        row = state.vm_rows[vm_name] = _encoder.encode(GwVm(node, vm.spec, vm.status, up))
    return row


def _extend(kind: Callable[..., T], obj: msgspec.Struct, node_state: NodeState) -> T:
    """Return `obj` as its fleet-view subclass `kind`, marked with its node's state."""
    fields = {name: getattr(obj, name) for name in obj.__struct_fields__}
    return kind(**fields, node_state=node_state)


def _put_bounded(table: OrderedDict[str, T], key: str, value: T, limit: int) -> None:
    table[key] = value
    table.move_to_end(key)
    if len(table) > limit:
        table.popitem(last=False)
