"""Snapshots per VM and their disk use, served by the snapshotter at scrape time."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edgevm.shared.layout import Layout
from edgevm.snapshotter.layers import VmFiles
from edgevm.snapshotter.metrics import SnapshotUse, snapshot_use
from tests.snapshotter.conftest import Pair
from tests.snapshotter.test_snapshot_tasks import make_vm, run


async def served(name: str, node: str) -> dict[str, float]:
    """{vm: value} of gauge `name` for `node`, scraped from a thread as the metrics server does."""
    text = (await asyncio.to_thread(generate_latest, REGISTRY)).decode()
    return {s.labels["vm"]: s.value for f in text_string_to_metric_families(text) if f.name == name
            for s in f.samples if s.labels["node"] == node}


async def test_the_snapshotter_counts_each_vms_snapshots(pair: Pair) -> None:
    vm, bare = await make_vm(pair), await make_vm(pair, "bare")
    for name in ("one", "two"):
        task = await run(pair, "snapshot.create", {"vm": vm, "name": name})
        assert task.status == "succeeded", task.error
    node = pair.node.config.node
    counts = await served("edgevm_vm_snapshots", node)
    assert (counts[vm], counts[bare]) == (2, 0)
    assert (await served("edgevm_vm_snapshot_disk_bytes", node))[vm] == 0, "internal snapshots: in the VM's disk"
    await pair.snapshotter.shutdown()
    assert b"edgevm_vm_snapshots{" not in await asyncio.to_thread(generate_latest, REGISTRY), "unregistered"


def test_disk_use_counts_the_frozen_images_only(tmp_path: Path) -> None:
    files = VmFiles(Layout.of(tmp_path).vm_dir("db"))
    files.vm_dir.mkdir(parents=True)
    files.ensure()
    for path, size in [(files.frozen("a"), "1M"), (files.frozen("b"), "2M"), (files.top("t1"), "4M")]:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
        # Real blocks, so that the allocation differs between the files.
        subprocess.run(["qemu-io", "-c", f"write 0 {size}", str(path)], check=True, capture_output=True)
    frozen = sum(files.frozen(n).stat().st_blocks * 512 for n in ("a", "b"))
    assert frozen > 3 * 1024**2
    use = snapshot_use({"db": 2, "web": 0}, tmp_path)
    assert use == {"db": SnapshotUse(2, frozen), "web": SnapshotUse(0, 0)}
