"""Per-VM and node-capacity metrics from libvirt's bulk domain stats: one call for all domains per scrape."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import libvirt
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from edgevm.lifecycle.drivers.naming import vm_name
from edgevm.lifecycle.drivers.states import DomainState, state_from_libvirt
from edgevm.shared.metrics import CachedRead

__all__ = ["FAMILIES", "STATS_GROUPS", "VmMetricsCollector", "read_bulk_stats"]

log = logging.getLogger(__name__)
DomainStats = Sequence[tuple[str, Mapping[str, Any]]]

# The groups asked for: a driver that lacks one (the test driver knows only `state`) leaves its keys out.
STATS_GROUPS = (
    libvirt.VIR_DOMAIN_STATS_STATE
    | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
    | libvirt.VIR_DOMAIN_STATS_BALLOON
    | libvirt.VIR_DOMAIN_STATS_VCPU
    | libvirt.VIR_DOMAIN_STATS_INTERFACE
    | libvirt.VIR_DOMAIN_STATS_BLOCK
)
_ACTIVE = (DomainState.RUNNING, DomainState.PAUSED, DomainState.SHUTTING_DOWN)

# Every family, exported on every scrape (empty when no VM has the stat): name -> (type, help).
FAMILIES: dict[str, tuple[str, str]] = {
    "edgevm_vm_stats_up": ("gauge", "1 when libvirt answered the last bulk stats read."),
    "edgevm_vm_stats_read_seconds": ("gauge", "Time libvirt took for the last bulk stats read."),
    "edgevm_vm_state": ("gauge", "1 for the VM's current state as libvirt reports it."),
    "edgevm_vm_cpu_seconds": ("counter", "CPU time the VM used (its vCPUs and QEMU's own threads)."),
    "edgevm_vm_vcpus": ("gauge", "vCPUs the VM has."),
    "edgevm_vm_memory_assigned_bytes": ("gauge", "Memory given to the VM."),
    "edgevm_vm_memory_balloon_bytes": ("gauge", "Memory the guest may use now (the balloon's size; the assigned "
                                                "memory when the guest has no balloon driver)."),
    "edgevm_vm_memory_rss_bytes": ("gauge", "Resident memory of the VM's QEMU process on the host."),
    "edgevm_vm_memory_guest_used_bytes": ("gauge", "Memory the guest reports in use (needs its balloon driver "
                                                   "with statistics)."),
    "edgevm_vm_disk_read_bytes": ("counter", "Bytes the VM read from the disk."),
    "edgevm_vm_disk_write_bytes": ("counter", "Bytes the VM wrote to the disk."),
    "edgevm_vm_disk_read_ops": ("counter", "Read requests of the VM to the disk."),
    "edgevm_vm_disk_write_ops": ("counter", "Write requests of the VM to the disk."),
    "edgevm_vm_disk_capacity_bytes": ("gauge", "Size of the disk as the guest sees it."),
    "edgevm_vm_disk_allocation_bytes": ("gauge", "Bytes of the host file the disk uses."),
    # Counted as the guest sees them: libvirt swaps a tap's host-side receive and transmit.
    "edgevm_vm_network_receive_bytes": ("counter", "Bytes received by the VM on the NIC."),
    "edgevm_vm_network_transmit_bytes": ("counter", "Bytes sent by the VM on the NIC."),
    "edgevm_vm_network_receive_packets": ("counter", "Packets received by the VM on the NIC."),
    "edgevm_vm_network_transmit_packets": ("counter", "Packets sent by the VM on the NIC."),
    "edgevm_vm_network_receive_errors": ("counter", "Receive errors on the VM's NIC."),
    "edgevm_vm_network_transmit_errors": ("counter", "Transmit errors on the VM's NIC."),
    "edgevm_vm_network_receive_drops": ("counter", "Received packets dropped on the VM's NIC."),
    "edgevm_vm_network_transmit_drops": ("counter", "Sent packets dropped on the VM's NIC."),
    "edgevm_node_cpus": ("gauge", "CPUs of the host."),
    "edgevm_node_memory_bytes": ("gauge", "Memory of the host."),
    "edgevm_node_allocated_vcpus": ("gauge", "vCPUs of the VMs that run (or are paused)."),
    "edgevm_node_allocated_memory_bytes": ("gauge", "Memory given to the VMs that run (or are paused)."),
    "edgevm_node_vms": ("gauge", "The node's VMs by libvirt state."),
}
# Per-device stats: family -> the libvirt key after `block.<i>.` / `net.<i>.`.
_DISK_KEYS = {
    "edgevm_vm_disk_read_bytes": "rd.bytes", "edgevm_vm_disk_write_bytes": "wr.bytes",
    "edgevm_vm_disk_read_ops": "rd.reqs", "edgevm_vm_disk_write_ops": "wr.reqs",
    "edgevm_vm_disk_capacity_bytes": "capacity", "edgevm_vm_disk_allocation_bytes": "allocation",
}
_NIC_KEYS = {
    "edgevm_vm_network_receive_bytes": "rx.bytes", "edgevm_vm_network_transmit_bytes": "tx.bytes",
    "edgevm_vm_network_receive_packets": "rx.pkts", "edgevm_vm_network_transmit_packets": "tx.pkts",
    "edgevm_vm_network_receive_errors": "rx.errs", "edgevm_vm_network_transmit_errors": "tx.errs",
    "edgevm_vm_network_receive_drops": "rx.drop", "edgevm_vm_network_transmit_drops": "tx.drop",
}
# Per-VM values: family -> (libvirt key, factor to base units). balloon.* are in KiB, cpu.time in ns.
_VM_KEYS = {
    "edgevm_vm_cpu_seconds": ("cpu.time", 1e-9),
    "edgevm_vm_vcpus": ("vcpu.current", 1.0),
    "edgevm_vm_memory_assigned_bytes": ("balloon.maximum", 1024.0),
    "edgevm_vm_memory_balloon_bytes": ("balloon.current", 1024.0),
    "edgevm_vm_memory_rss_bytes": ("balloon.rss", 1024.0),
}


def read_bulk_stats(conn: libvirt.virConnect) -> list[tuple[str, dict[str, Any]]]:
    """(VM, stats) of every edgevm domain, from one `virConnectGetAllDomainStats` call (blocking)."""
    found = []
    for domain, stats in conn.getAllDomainStats(STATS_GROUPS):
        vm = vm_name(domain.name())
        if vm is not None:
            found.append((vm, stats))
    return found


class _Families:
    """The metric families of one scrape."""

    def __init__(self) -> None:
        self.all: dict[str, Metric] = {
            name: (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, text)
            for name, (kind, text) in FAMILIES.items()
        }
        # Sample names as exposed: a counter `x` is sampled as `x_total`.
        self._samples = {name: name + ("_total" if kind == "counter" else "") for name, (kind, _) in FAMILIES.items()}

    def add(self, name: str, labels: dict[str, str], value: float) -> None:
        self.all[name].samples.append(Sample(self._samples[name], labels, value))


class VmMetricsCollector(Collector):
    """Exports each VM's state, CPU, memory, disks and NICs, and the node's capacity, at scrape time.

    `read` returns the bulk stats (see `read_bulk_stats`); it runs on the scraping thread, at most once
    per `max_age` seconds (concurrent or quickly repeated scrapes share one read).
    """

    def __init__(self, read: Callable[[], DomainStats], node: str, host_cpus: int, host_memory: int,
                 max_age: float = 1.0) -> None:
        self._read = CachedRead(read, max_age)
        self._node = node
        self._host_cpus = host_cpus
        self._host_memory = host_memory

    def describe(self) -> Iterator[Metric]:
        """The families without samples, so registering does not read the stats (from the event loop)."""
        yield from _Families().all.values()

    def collect(self) -> Iterator[Metric]:
        """Yield every family of FAMILIES."""
        families = _Families()
        try:
            stats, took = self._read()
            ok = True
        except Exception as exc:  # the scrape goes on with what is known without libvirt
            log.warning("VM stats not read for the scrape: %s", str(exc) or type(exc).__name__)
            stats, took, ok = [], 0.0, False
        node = {"node": self._node}
        families.add("edgevm_vm_stats_up", node, 1.0 if ok else 0.0)
        families.add("edgevm_vm_stats_read_seconds", node, took)
        by_state = dict.fromkeys(DomainState, 0)
        vcpus = memory = 0.0
        for vm, values in stats:
            state = state_from_libvirt(values.get("state.state", -1), values.get("state.reason", 0))
            by_state[state] += 1
            self._add_vm(families, vm, state, values)
            if state in _ACTIVE:
                vcpus += values.get("vcpu.current", 0)
                memory += values.get("balloon.maximum", 0) * 1024.0
        families.add("edgevm_node_cpus", node, float(self._host_cpus))
        families.add("edgevm_node_memory_bytes", node, float(self._host_memory))
        families.add("edgevm_node_allocated_vcpus", node, float(vcpus))
        families.add("edgevm_node_allocated_memory_bytes", node, memory)
        for state, count in by_state.items():
            families.add("edgevm_node_vms", {**node, "state": state.value}, float(count))
        yield from families.all.values()

    def _add_vm(self, families: _Families, vm: str, state: DomainState, values: Mapping[str, Any]) -> None:
        labels = {"node": self._node, "vm": vm}
        families.add("edgevm_vm_state", {**labels, "state": state.value}, 1.0)
        for name, (key, factor) in _VM_KEYS.items():
            if key in values:
                families.add(name, labels, values[key] * factor)
        if "balloon.available" in values and "balloon.unused" in values:
            used = (values["balloon.available"] - values["balloon.unused"]) * 1024.0
            families.add("edgevm_vm_memory_guest_used_bytes", labels, used)
        for i in range(values.get("block.count", 0)):
            prefix = f"block.{i}."
            disk = {**labels, "disk": str(values.get(prefix + "name", i))}
            for name, key in _DISK_KEYS.items():
                if prefix + key in values:
                    families.add(name, disk, float(values[prefix + key]))
        for i in range(values.get("net.count", 0)):
            prefix = f"net.{i}."
            nic = {**labels, "nic": str(values.get(prefix + "name", i))}
            for name, key in _NIC_KEYS.items():
                if prefix + key in values:
                    families.add(name, nic, float(values[prefix + key]))
