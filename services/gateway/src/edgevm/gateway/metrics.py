"""Fleet metrics computed from the read model at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edgevm.gateway.model import FleetModel


class FleetCollector(Collector):
    """Exports nodes by state and VMs by node and state."""

    def __init__(self, model: FleetModel) -> None:
        self._model = model

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the fleet gauges."""
        nodes = GaugeMetricFamily("edgevm_fleet_node_up", "1 when the node's heartbeat is recent.", labels=["node"])
        for info in self._model.node_list():
            nodes.add_metric([info.node], 1.0 if info.state == "up" else 0.0)
        yield nodes
        vms = GaugeMetricFamily("edgevm_fleet_vms", "VMs by node and state.", labels=["node", "state"])
        counts: dict[tuple[str, str], int] = {}
        for (node, _), vm in self._model.vms.items():
            counts[(node, vm.status.state)] = counts.get((node, vm.status.state), 0) + 1
        for (node, state), count in sorted(counts.items()):
            vms.add_metric([node, state], count)
        yield vms
