"""Where the changes of the flow tables go: events and history records into the outbox, the flow metrics, and
the ids of flows that ended lately (a late terminate of one is answered 409 from memory)."""

from __future__ import annotations

import collections
import operator
import time

import msgspec

from edgevm.flowwatch import metrics
from edgevm.flowwatch.flowtable import ActiveFlow, Changes, NamespaceFlows, rfc3339
from edgevm.flowwatch.outbox import Outbox
from edgevm.shared.clock import now
from edgevm.shared.objects import Flow

__all__ = ["FlowRecorder"]

_vm_of = operator.attrgetter("vm")
RECENTLY_ENDED = 50_000
DEFER_OVER = 64  # more flows opened at once (a resync's) are announced in the background, in chunks
CHUNK = 512


class FlowRecorder:
    """Records what happens to flows: `flow.opened` for new ones, a history record and `flow.closed` or
    `flow.terminated` for ended ones, once each."""

    def __init__(self, node: str, outbox: Outbox) -> None:
        self.node = node
        self.outbox = outbox
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()  # flow id -> vm
        self.terminating: dict[str, str] = {}  # flow id -> vm, while flow.terminate works on it

    def report(self, _flows: NamespaceFlows, changes: Changes) -> None:
        """Record the changes a namespace's table went through."""
        node, outbox = self.node, self.outbox
        opened = changes.opened
        if len(opened) > DEFER_OVER:
            for at in range(0, len(opened), CHUNK):
                chunk = opened[at : at + CHUNK]
                outbox.opened_later(len(chunk), lambda chunk=chunk: [f.to_flow(node, "active") for f in chunk])
        else:
            at = now() if opened or changes.closed else ""
            for flow in opened:
                outbox.opened(flow.to_flow(node, "active"), at)
        for vm, n in collections.Counter(map(_vm_of, opened)).items():
            metrics.FLOWS.labels(vm, "opened").inc(n)
        closed: collections.Counter[str] = collections.Counter()
        at = now() if changes.closed else ""
        for flow, end_ns in changes.closed:
            self.ended(flow, "completed", end_ns, at)
            closed[flow.vm] += 1
        for vm, n in closed.items():
            metrics.FLOWS.labels(vm, "closed").inc(n)

    def ended(self, flow: ActiveFlow, status: str, end_ns: int, at: str | None = None) -> Flow:
        """Record that a flow ended (`completed` or `terminated`); its record. at: the event's time (now)."""
        record = flow.to_flow(self.node, status, end_ns)
        self.ended_record(record, at)
        return record

    def ended_record(self, record: Flow, at: str | None = None) -> None:
        """Record an ended flow from its Flow."""
        self.outbox.ended(record, at)
        self.remember_ended(record.id, record.vm)

    def forgotten(self, records: list[Flow], end_ns: int | None = None) -> None:
        """Record flows a previous run announced that ended while nobody watched: completed, ended at
        end_ns (now: when this run found them gone), with the counters last seen."""
        ended_at = rfc3339(end_ns or time.time_ns())
        for record in records:
            done = msgspec.structs.replace(record, status="completed", ended_at=ended_at)
            self.ended_record(done)
            metrics.FLOWS.labels(done.vm, "closed").inc()

    def remember_ended(self, flow_id: str, vm: str) -> None:
        """Keep a flow id among those that ended lately."""
        self._ended[flow_id] = vm
        self.terminating.pop(flow_id, None)
        if len(self._ended) > RECENTLY_ENDED:
            self._ended.popitem(last=False)

    def ended_vm(self, flow_id: str) -> str | None:
        """The VM of a flow that ended lately (or is being terminated), None if it is not one of those."""
        return self.terminating.get(flow_id) or self._ended.get(flow_id)

    def recently_ended(self) -> list[tuple[str, str]]:
        """(id, vm) of the flows that ended lately, oldest first."""
        return list(self._ended.items())
