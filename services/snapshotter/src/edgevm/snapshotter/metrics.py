"""Snapshots per VM and the host disk their frozen images use, counted at scrape time."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import libvirt
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgevm.shared.layout import Layout
from edgevm.shared.libvirt.naming import vm_name
from edgevm.shared.metrics import CachedRead
from edgevm.snapshotter.layers import FROZEN_PREFIX, VmFiles

__all__ = ["SnapshotCollector", "SnapshotUse", "count_snapshots", "snapshot_use"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SnapshotUse:
    """One VM's snapshots: how many, and the bytes their frozen images take on the host."""

    count: int
    disk_bytes: int


def count_snapshots(conn: libvirt.virConnect) -> dict[str, int]:
    """Snapshots of every edgevm domain (blocking; libvirt has no bulk call, so one per domain)."""
    counts = {}
    for domain in conn.listAllDomains():
        vm = vm_name(domain.name())
        if vm is not None:
            try:
                counts[vm] = domain.snapshotNum()
            except libvirt.libvirtError as error:
                if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise  # undefined since the list was read: left out
    return counts


def snapshot_use(counts: Mapping[str, int], state_dir: Path) -> dict[str, SnapshotUse]:
    """Add to each VM's count the space of its external snapshots' frozen images (blocks really used).

    Internal snapshots live inside the VM's disk file: their space is in lifecycle's disk allocation.
    """
    found = {}
    layout = Layout.of(state_dir)
    for vm, count in counts.items():
        used = 0
        for image in VmFiles(layout.vm_dir(vm)).images() if count else []:
            if image.name.startswith(FROZEN_PREFIX):
                try:
                    used += image.stat().st_blocks * 512
                except FileNotFoundError:
                    pass  # deleted since listed
        found[vm] = SnapshotUse(count, used)
    return found


class SnapshotCollector(Collector):
    """Exports edgevm_vm_snapshots and edgevm_vm_snapshot_disk_bytes per VM; `read` runs at most once per
    `max_age` seconds, on the scraping thread."""

    def __init__(self, read: Callable[[], Mapping[str, SnapshotUse]], node: str, max_age: float = 10.0) -> None:
        self._read = CachedRead(read, max_age)
        self._node = node

    def describe(self) -> Iterator[Metric]:
        """The families without samples (registering must not read)."""
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        """Yield both gauges (empty when libvirt does not answer)."""
        count, disk = self._families()
        try:
            use, _took = self._read()
        except Exception as exc:  # the scrape goes on without these
            log.warning("snapshots not counted for the scrape: %s", str(exc) or type(exc).__name__)
            use = {}
        for vm, figures in sorted(use.items()):
            count.add_metric([self._node, vm], figures.count)
            disk.add_metric([self._node, vm], figures.disk_bytes)
        yield count
        yield disk

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("edgevm_vm_snapshots", "Snapshots of the VM.", labels=["node", "vm"]),
            GaugeMetricFamily("edgevm_vm_snapshot_disk_bytes", "Host disk used by the VM's external snapshots' "
                              "frozen images (internal snapshots are inside the VM's disk file).",
                              labels=["node", "vm"]),
        )
