"""netplumb's reconcile metrics: every pass timed, its repairs counted, a clean pass counting none."""

from __future__ import annotations

import asyncio
import subprocess

from prometheus_client import REGISTRY
from tests.netplumb.conftest import NetNode


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_reconciles_are_timed_and_their_repairs_counted(node: str, netplumb: NetNode) -> None:
    await netplumb.call("net.vrf.create", {"name": "red", "subnet": "10.9.0.0/24"})
    passes, changes = sample("edgevm_netplumb_reconcile_duration_seconds_count"), sample(
        "edgevm_netplumb_reconcile_changes_total")
    failures = sample("edgevm_netplumb_reconcile_failures_total")

    assert await netplumb.call("net.reconcile") == {"changes": [], "failures": []}
    assert sample("edgevm_netplumb_reconcile_duration_seconds_count") == passes + 1
    assert sample("edgevm_netplumb_reconcile_changes_total") == changes, "a clean pass changes nothing"

    await asyncio.to_thread(subprocess.run, ["ip", "netns", "delete", f"{node}-red"], check=True)
    repaired = await netplumb.call("net.reconcile")
    assert repaired["changes"] and not repaired["failures"]
    assert sample("edgevm_netplumb_reconcile_duration_seconds_count") == passes + 2
    assert sample("edgevm_netplumb_reconcile_changes_total") == changes + len(repaired["changes"])
    assert sample("edgevm_netplumb_reconcile_failures_total") == failures
