"""The fleet read model: nodes, VMs, recent tasks and flows of every node, built from events."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from edgevm.shared.commands import GwVm, NodeInfo
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

# A node whose last heartbeat is older than this is shown `down` (heartbeats come every 10 s).
NODE_DOWN_AFTER = 35.0
MAX_TASKS = 20_000
MAX_FLOWS = 20_000
T = TypeVar("T")


@dataclass
class NodeState:
    """What the gateway knows of one node."""

    last_seen: str = ""
    services: dict[str, str] = field(default_factory=dict)  # service -> its last heartbeat
    cpus: int = 0
    memory_bytes: int = 0


def _age(at: str, now: datetime) -> float:
    try:
        return (now - datetime.fromisoformat(at.replace("Z", "+00:00"))).total_seconds()
    except ValueError:
        return float("inf")


class FleetModel:
    """Applies events in stream order and answers the gateway's queries from memory."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeState] = {}
        self.vms: dict[tuple[str, str], Vm] = {}
        self.tasks: OrderedDict[tuple[str, str], Task] = OrderedDict()
        self.flows: OrderedDict[tuple[str, str], Flow] = OrderedDict()
        self.applied = 0

    def ingest(self, subject: str, data: bytes) -> None:
        """Decode and apply the event `data` published on `subject` (`edgevm.evt.<node>.<kind>...`)."""
        self.apply(subject.split(".", 3)[2], decode_event(data))

    def apply(self, node: str, event: AnyEvent) -> None:
        """Apply one event of `node`."""
        self.applied += 1
        state = self.nodes.get(node)
        if state is None:
            state = self.nodes[node] = NodeState()
        if isinstance(event, Heartbeat):
            state.last_seen = max(state.last_seen, event.at)
            for service in event.services:
                state.services[service] = event.at
            state.cpus, state.memory_bytes = event.cpus, event.memory_bytes
        elif isinstance(event, VmEvent):
            key = (node, event.vm.spec.name)
            if isinstance(event, VmDeleted):
                self.vms.pop(key, None)
            else:
                self.vms[key] = event.vm
        elif isinstance(event, TaskUpdated):
            _put_bounded(self.tasks, (node, event.task.id), event.task, MAX_TASKS)
        elif isinstance(event, FlowEvent):
            _put_bounded(self.flows, (node, event.flow.id), event.flow, MAX_FLOWS)

    def node_list(self, now: datetime | None = None) -> list[NodeInfo]:
        """Return every node with its VM count, its live services and whether it is up."""
        now = now or datetime.now(UTC)
        counts: dict[str, int] = {}
        for node, _ in self.vms:
            counts[node] = counts.get(node, 0) + 1
        nodes = []
        for name in sorted(self.nodes):
            state = self.nodes[name]
            live = sorted(s for s, at in state.services.items() if _age(at, now) <= NODE_DOWN_AFTER)
            up = bool(state.last_seen) and _age(state.last_seen, now) <= NODE_DOWN_AFTER
            nodes.append(NodeInfo(name, state.last_seen, counts.get(name, 0), "up" if up else "down", live))
        return nodes

    def vm_list(self, node: str | None) -> list[GwVm]:
        """Return the VMs of one node or of all, ordered by node and name."""
        return [
            GwVm(n, vm.spec, vm.status)
            for (n, _), vm in sorted(self.vms.items())
            if node is None or n == node
        ]

    def task_list(self, node: str | None, vm: str | None, limit: int) -> list[Task]:
        """Return the newest tasks first (ids sort by creation time), filtered by node and VM."""
        rows = [
            t for (n, _), t in self.tasks.items()
            if (node is None or n == node) and (vm is None or t.vm == vm)
        ]
        rows.sort(key=lambda t: t.id, reverse=True)
        return rows[:limit]

    def flow_list(self, node: str | None, vm: str | None, status: str, limit: int) -> list[Flow]:
        """Return the newest flows first, filtered by node, VM and status (active, completed or all)."""
        def wanted(n: str, f: Flow) -> bool:
            if (node is not None and n != node) or (vm is not None and f.vm != vm):
                return False
            return status == "all" or (f.status == "active") == (status == "active")

        rows = [f for (n, _), f in self.flows.items() if wanted(n, f)]
        rows.sort(key=lambda f: f.started_at, reverse=True)
        return rows[:limit]


def _put_bounded(table: OrderedDict[tuple[str, str], T], key: tuple[str, str], value: T, limit: int) -> None:
    table[key] = value
    table.move_to_end(key)
    if len(table) > limit:
        table.popitem(last=False)
