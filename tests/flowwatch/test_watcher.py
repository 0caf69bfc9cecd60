"""A namespace watch on its own: start-up dump, events, and a resync after an overrun."""

from __future__ import annotations

import asyncio
import socket

from edgevm.flowwatch import ctsource
from edgevm.flowwatch.flowtable import Changes, NamespaceFlows
from edgevm.flowwatch.watcher import NamespaceWatch

from ..helpers import eventually
from .conftest import udp_burst, udp_exchange


def tracked(netns: str) -> set[tuple]:
    """The original tuples of the UDP entries the kernel has in netns now."""
    return {e.orig for e in ctsource.dump(netns) if e.orig.proto == socket.IPPROTO_UDP}


async def test_the_table_follows_the_kernel_and_an_overrun_brings_a_resync(netns: str) -> None:
    udp_exchange(netns)  # there before the watch: found by the start-up dump
    flows = NamespaceFlows(netns, {"127.0.0.1": "vm-lo"})
    reports: list[Changes] = []
    watch = NamespaceWatch(flows, netns, lambda _flows, changes: reports.append(changes), rcvbuf=4096)
    task = asyncio.create_task(watch.run())
    try:
        await asyncio.wait_for(watch.ready.wait(), 10)
        assert watch.resyncs == {"start": 1}
        assert set(flows.outbound) == tracked(netns)

        await asyncio.to_thread(udp_exchange, netns)
        await eventually(lambda: _now(set(flows.outbound) == tracked(netns)), 5, "the new flow")
        assert watch.resyncs["overrun"] == 0

        udp_burst(netns, 3000)  # on the loop's own thread: nobody reads, the 4 KiB buffer overflows
        await eventually(lambda: _now(watch.resyncs["overrun"] >= 1), 5, "a resync after the overrun")
        await eventually(lambda: _now(set(flows.outbound) == tracked(netns)), 5, "the table equal to the kernel's")
        assert len(flows.outbound) >= 3000 and len(flows.inbound) == len(flows.outbound)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _now(value: object) -> object:
    return value
