"""Fleet metrics computed from the read model at scrape time.

Scrapes run on the metrics server's threads while the event loop changes the model: the collector has the
loop read the model (shared.metrics.on_loop), so a scrape never sees a table mid-change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgevm.gateway.model import FleetModel
from edgevm.shared.metrics import on_loop


class FleetCollector(Collector):
    """Exports nodes by state, VMs by node and state, tasks by node and status, events and lag by node."""

    def __init__(self, model: FleetModel, loop: asyncio.AbstractEventLoop) -> None:
        self._model = model
        self._loop = loop
        self._read_on_loop = on_loop(self._read, loop)

    def describe(self) -> list[Metric]:
        """Return the metric families (registration calls it on the loop's own thread, so read directly)."""
        return self.read()

    def collect(self) -> Iterator[Metric]:
        """Yield the fleet metrics, read from the model by the event loop that owns it."""
        if not self._loop.is_closed():
            yield from self._read_on_loop()

    async def _read(self) -> list[Metric]:
        return self.read()

    def read(self) -> list[Metric]:
        """Return the fleet metrics as the model is now (call it on the model's event loop)."""
        up = GaugeMetricFamily("edgevm_fleet_node_up", "1 when the node's heartbeat is recent, 0 when it is "
                               "unreachable.", labels=["node"])
        by_state = GaugeMetricFamily("edgevm_fleet_nodes", "Nodes by state (up, unreachable).", labels=["state"])
        seen = GaugeMetricFamily("edgevm_fleet_node_last_heartbeat_timestamp_seconds",
                                 "When the node's newest heartbeat was stamped (its clock), Unix time.",
                                 labels=["node"])
        vms = GaugeMetricFamily("edgevm_fleet_vms", "VMs by node and state (last known for an unreachable "
                                "node).", labels=["node", "state"])
        tasks = GaugeMetricFamily("edgevm_fleet_tasks", "Recent tasks the gateway holds (newest 1,000 per node), "
                                  "by node and status.", labels=["node", "status"])
        events = CounterMetricFamily("edgevm_fleet_events", "Events of the node applied since the gateway "
                                     "started (its start-up replay included).", labels=["node"])
        lag = GaugeMetricFamily("edgevm_fleet_node_event_lag_seconds", "Seconds from the `at` of the node's "
                                "newest event to its ingest (clock skew included).", labels=["node"])
        counts = {"up": 0, "unreachable": 0}
        for info in self._model.node_list():
            counts[info.state] += 1
            up.add_metric([info.node], 1.0 if info.state == "up" else 0.0)
        for state, count in counts.items():
            by_state.add_metric([state], count)
        for name, record in sorted(self._model.nodes.items()):
            if record.last_seen:
                seen.add_metric([name], record.last_seen_at)
            for key, count in _count(vm.status.state for vm in record.vms.values()):
                vms.add_metric([name, key], count)
            for key, count in _count(task.status for task in record.tasks.values()):
                tasks.add_metric([name, key], count)
            events.add_metric([name], record.events)
            lag.add_metric([name], record.last_lag)
        return [up, by_state, seen, vms, tasks, events, lag]


def _count(values: Iterator[str]) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return sorted(counts.items())
