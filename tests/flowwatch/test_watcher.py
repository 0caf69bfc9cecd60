"""A namespace watch on its own: start-up dump, events, and a resync after an overrun."""

from __future__ import annotations

import asyncio
import socket
import subprocess

from edgevm.flowwatch.drivers import ctsource
from edgevm.flowwatch.flowtable import Changes, NamespaceFlows
from edgevm.flowwatch.watcher import NamespaceWatch
from edgevm.shared.netns import write_sysctl

from ..helpers import eventually
from .conftest import HOOK_RULES, udp_burst, udp_exchange


def tracked(netns: str) -> set[tuple]:
    """The original tuples of the UDP entries the kernel has in netns now."""
    return {e.orig for e in ctsource.dump(netns) if e.orig.proto == socket.IPPROTO_UDP}


async def test_the_table_follows_the_kernel_and_an_overrun_brings_a_resync(netns: str) -> None:
    udp_exchange(netns)  # there before the watch: found by the start-up dump
    flows = NamespaceFlows(netns, {"127.0.0.1": "vm-lo"})
    reports: list[Changes] = []
    watch = NamespaceWatch(flows, netns, lambda _flows, changes: reports.append(changes), rcvbuf=4096)
    watch.start()
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
        await watch.stop()


async def _now(value: object) -> object:
    return value


def _namespace(name: str) -> None:
    """A conntrack-hooked namespace of this very name (made anew when the name is free again)."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "netns", "exec", name, "nft", "-f", "-"], input=HOOK_RULES, text=True, check=True)


def _delete(name: str) -> None:
    subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


async def test_a_namespace_deleted_ends_its_flows_and_one_made_anew_is_watched(netns: str) -> None:
    name = f"{netns}-again"
    _namespace(name)
    try:
        flows = NamespaceFlows(name, {"127.0.0.1": "vm-lo"})
        closed: list[object] = []
        watch = NamespaceWatch(flows, name, lambda _f, changes: closed.extend(changes.closed))
        watch.start()
        try:
            await asyncio.wait_for(watch.ready.wait(), 10)
            await asyncio.to_thread(udp_exchange, name)
            await eventually(lambda: _now(len(flows) == 2), 5, "the flows")
            await asyncio.to_thread(_delete, name)
            await eventually(lambda: _now(len(closed) == 2 and len(flows) == 0), 10, "the flows ended")
            await asyncio.to_thread(_namespace, name)  # the same name, another namespace: watched, not the dead one
            await eventually(lambda: _now(watch.resyncs["start"] >= 2), 15, "the new namespace watched")
            await asyncio.to_thread(udp_exchange, name)
            await eventually(lambda: _now(len(flows) == 2), 5, "the new namespace's flows")
        finally:
            await watch.stop()
    finally:
        await asyncio.to_thread(_delete, name)


async def test_an_entry_made_while_nobody_listened_ends_its_flow_at_the_sweep(netns: str) -> None:
    """With the kernel's default nf_conntrack_events=2 an entry made with no listener never sends events."""
    write_sysctl(netns, "net.netfilter.nf_conntrack_events", "2")
    client, _ = udp_exchange(netns)
    flows = NamespaceFlows(netns, {"127.0.0.1": "vm-lo"})
    closed: list[object] = []
    watch = NamespaceWatch(flows, netns, lambda _f, changes: closed.extend(changes.closed), sweep_interval=1.0)
    watch.start()
    try:
        await asyncio.wait_for(watch.ready.wait(), 10)
        assert len(flows) == 2
        argv = ["ip", "netns", "exec", netns, "conntrack", "-D", "-p", "udp", "--sport", str(client)]
        await asyncio.to_thread(subprocess.run, argv, check=True, capture_output=True)
        await eventually(lambda: _now(len(closed) == 2 and len(flows) == 0), 5, "the flows ended by the sweep")
    finally:
        await watch.stop()
