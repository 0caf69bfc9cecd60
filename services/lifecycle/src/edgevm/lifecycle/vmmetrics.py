"""Per-VM and node-capacity metrics from libvirt's bulk domain stats: one call for all domains per scrape."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import libvirt

from edgevm.shared.libvirt.naming import vm_name
from edgevm.shared.libvirt.states import DomainState, state_from_libvirt
from edgevm.shared.metrics import CachedRead
from edgevm.shared.textformat import label_value

__all__ = ["FAMILIES", "STATS_GROUPS", "VmMetrics", "free_in_background", "read_bulk_stats"]

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
# The device groups of the stats: (libvirt's prefix, our label, family -> key).
_DEVICES = (("block", "disk", _DISK_KEYS), ("net", "nic", _NIC_KEYS))
# Per-VM values: family -> (libvirt key, factor to base units). balloon.* are in KiB, cpu.time in ns.
_VM_KEYS = {
    "edgevm_vm_cpu_seconds": ("cpu.time", 1e-9),
    "edgevm_vm_vcpus": ("vcpu.current", 1.0),
    "edgevm_vm_memory_assigned_bytes": ("balloon.maximum", 1024.0),
    "edgevm_vm_memory_balloon_bytes": ("balloon.current", 1024.0),
    "edgevm_vm_memory_rss_bytes": ("balloon.rss", 1024.0),
}


def read_bulk_stats(conn: libvirt.virConnect,
                    dispose: Callable[[list[Any]], object] = lambda _: None) -> DomainStats:
    """(VM, stats) of every edgevm domain, from one `virConnectGetAllDomainStats` call (blocking).

    `dispose` is handed the call's records (with their domain objects) once they are read, to free them
    elsewhere: freeing a domain object lets go of the GIL and takes it again, for 1,000 VMs about 1.3 ms, a
    third of the call, which a scrape need not wait for (see `free_in_background`).
    """
    records = conn.getAllDomainStats(STATS_GROUPS)
    found = []
    for domain, stats in records:
        vm = vm_name(domain.name())
        if vm is not None:
            found.append((vm, stats))
    dispose(records)
    return found


_FREEING = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stats-free")


def free_in_background(records: list[Any]) -> None:
    """Empty `records` on a thread of its own, freeing its domain objects there (a `dispose` for read_bulk_stats)."""
    _FREEING.submit(records.clear)


class VmMetrics:
    """Each VM's state, CPU, memory, disks and NICs, and the node's capacity, rendered at scrape time.

    `read` returns the bulk stats (see `read_bulk_stats`); it runs on the scraping thread (libvirt's call
    needs no other: a thread switch costs more than it saves), at most once per `max_age` seconds (concurrent
    or quickly repeated scrapes share one read, the others waiting for it up to a deadline). The text is
    written here rather than by prometheus_client (see `edgevm.shared.metrics.Exposition`): served through
    `Exposition.add(vm_metrics.exposition)`.
    """

    def __init__(self, read: Callable[[], DomainStats], node: str, host_cpus: int, host_memory: int,
                 max_age: float = 1.0) -> None:
        self._read = CachedRead(read, max_age)
        self._node = f'node="{label_value(node)}"'
        self._host_cpus = host_cpus
        self._host_memory = host_memory
        self._known: dict[tuple[str, int, int], tuple[DomainState, str, str]] = {}

    def exposition(self) -> str:
        """Every family of FAMILIES in the text format 0.0.4 (empty ones too, so every name is served)."""
        try:
            stats, took = self._read()
            ok = True
        except Exception as exc:  # the scrape goes on with what is known without libvirt
            log.warning("VM stats not read for the scrape: %s", str(exc) or type(exc).__name__)
            stats, took, ok = [], 0.0, False
        lines: dict[str, list[str]] = {name: [] for name in FAMILIES}
        node = f"{{{self._node}}}"
        lines["edgevm_vm_stats_up"].append(f"edgevm_vm_stats_up{node} {1 if ok else 0}\n")
        lines["edgevm_vm_stats_read_seconds"].append(f"edgevm_vm_stats_read_seconds{node} {took!r}\n")
        by_state = dict.fromkeys(DomainState, 0)
        vcpus = memory = 0
        states = lines["edgevm_vm_state"]
        # A VM's labels and state line are the same from scrape to scrape until its state changes: written
        # once, they are looked up (kept for the VMs of the last scrape only).
        known, self._known = self._known, {}
        for vm, values in stats:
            key = (vm, values.get("state.state", -1), values.get("state.reason", 0))
            state, labels, state_line = self._known[key] = known.get(key) or self._vm_lines(*key)
            by_state[state] += 1
            states.append(state_line)
            if len(values) <= 2:
                continue  # its state only: shut off, or a driver that reports nothing else
            self._add_details(lines, labels, values)
            if state in _ACTIVE:
                vcpus += values.get("vcpu.current", 0)
                memory += values.get("balloon.maximum", 0) * 1024
        for name, value in [("edgevm_node_cpus", self._host_cpus), ("edgevm_node_memory_bytes", self._host_memory),
                            ("edgevm_node_allocated_vcpus", vcpus), ("edgevm_node_allocated_memory_bytes", memory)]:
            lines[name].append(f"{name}{node} {value}\n")
        lines["edgevm_node_vms"] += [f'edgevm_node_vms{{{self._node},state="{state}"}} {count}\n'
                                     for state, count in by_state.items()]
        return "".join([_HEADERS[name] + "".join(family) for name, family in lines.items()])

    def _vm_lines(self, vm: str, state_number: int, reason: int) -> tuple[DomainState, str, str]:
        """A VM's state, its labels, and its edgevm_vm_state line."""
        state = state_from_libvirt(state_number, reason)
        labels = f'{self._node},vm="{label_value(vm)}"'
        return state, labels, f'edgevm_vm_state{{{labels},state="{state}"}} 1\n'

    @staticmethod
    def _add_details(lines: dict[str, list[str]], labels: str, values: Mapping[str, Any]) -> None:
        for name, (key, factor) in _VM_KEYS.items():
            if key in values:
                lines[name].append(f"{_SAMPLES[name]}{{{labels}}} {values[key] * factor!r}\n")
        if "balloon.available" in values and "balloon.unused" in values:
            used = (values["balloon.available"] - values["balloon.unused"]) * 1024
            lines["edgevm_vm_memory_guest_used_bytes"].append(f"edgevm_vm_memory_guest_used_bytes{{{labels}}} {used}\n")
        for group, label, keys in _DEVICES:
            for i in range(values.get(f"{group}.count", 0)):
                prefix = f"{group}.{i}."
                device = f'{{{labels},{label}="{label_value(str(values.get(prefix + "name", i)))}"}} '
                for name, key in keys.items():
                    if prefix + key in values:
                        lines[name].append(f"{_SAMPLES[name]}{device}{values[prefix + key]}\n")


# A counter `x` is sampled as `x_total`.
_SAMPLES = {name: name + "_total" if kind == "counter" else name for name, (kind, _) in FAMILIES.items()}
_HEADERS = {name: f"# HELP {_SAMPLES[name]} {text}\n# TYPE {_SAMPLES[name]} {kind}\n"
            for name, (kind, text) in FAMILIES.items()}
