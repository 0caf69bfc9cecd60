"""A hub and two nodes on loopback: commands through the hub, events sourced across domains through cuts and
a hub restart, each node's credentials confined to its own subjects, a removed node refused."""

from __future__ import annotations

import asyncio
import json
import time

import nats
import pytest
from nats.aio.client import Client as NATS

from edgevm.shared.client import Client
from edgevm.shared.errors import EdgevmError
from tests.fleet.conftest import Fleet, prepare_image, wait_task
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(600)


async def stream_events(nc: NATS, node: str) -> list[tuple[int, str, bytes]]:
    """Return (source sequence, subject, data) of node `node`'s events in the hub's EDGEVM_EVENTS, in order."""
    js = nc.jetstream(timeout=10)
    info = await js.stream_info("EDGEVM_EVENTS")
    found: list[tuple[int, str, bytes]] = []
    if info.state.messages == 0:
        return found
    sub = await js.subscribe(f"edgevm.evt.{node}.>", stream="EDGEVM_EVENTS", ordered_consumer=True)
    try:
        pending = (await sub.consumer_info()).num_pending
        for _ in range(pending):
            msg = await sub.next_msg(timeout=5)
            # Nats-Stream-Source: "<stream>:<hash> <source sequence> ...": where the hub got the message from.
            source_seq = int((msg.headers or {})["Nats-Stream-Source"].split()[1])
            found.append((source_seq, msg.subject, msg.data))
    finally:
        await sub.unsubscribe()
    return found


async def node_events(url: str) -> list[tuple[int, str, bytes]]:
    """Return (sequence, subject, data) of every event in a node's own EDGEVM_EVENTS."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream(timeout=10)
        last = (await js.stream_info("EDGEVM_EVENTS")).state.last_seq
        found = []
        for seq in range(1, last + 1):
            msg = await js.get_msg("EDGEVM_EVENTS", seq)
            found.append((seq, msg.subject, msg.data))
        return found
    finally:
        await nc.close()


async def caught_up(fleet: Fleet, node: str) -> list[tuple[int, str, bytes]]:
    """Wait until the hub holds every event node `node` has; return the hub's copy."""
    mine = await node_events(fleet.nodes[node].url)
    admin = await fleet.admin()
    try:
        async def complete() -> list[tuple[int, str, bytes]] | None:
            theirs = await stream_events(admin, node)
            return theirs if len(theirs) >= len(mine) else None

        theirs = await eventually(complete, timeout=90, what=f"the hub holds all {len(mine)} events of {node}")
    finally:
        await admin.close()
    # The node goes on publishing (heartbeats): the hub may hold more than was read from the node before.
    assert [seq for seq, _, _ in theirs] == list(range(1, len(theirs) + 1)), "in order, none missing, none twice"
    assert theirs[:len(mine)] == mine, "the hub holds the node's events as the node stored them"
    return theirs


async def test_a_client_of_the_hub_creates_and_starts_a_vm_on_each_node(fleet: Fleet) -> None:
    nc = await fleet.operator()
    try:
        for node in ("a", "b"):
            client = Client(nc, node, timeout=15)
            await eventually(lambda client=client: client.call("vm.list"), timeout=60,
                             what=f"node {node} answers through the hub")
            await prepare_image(client, fleet.nodes[node].state)
            vm = await client.call("vm.create", {"name": f"web-{node}", "image": "base"})
            assert vm["status"]["state"] == "defined"
            await wait_task(client, (await client.call("vm.start", {"name": f"web-{node}"}))["task"]["id"])
            assert (await client.call("vm.get", {"name": f"web-{node}"}))["status"]["state"] == "running"

        async def both_listed() -> bool:
            reply = await Client(nc, "a", timeout=5).gateway("vm.list")
            names = {(v.get("node"), v["spec"]["name"]) for v in reply["vms"]}
            return {("a", "web-a"), ("b", "web-b")} <= names

        for node in ("a", "b"):
            await caught_up(fleet, node)
        await eventually(both_listed, timeout=30, what="gw.vm.list at the hub shows both nodes' VMs")
    finally:
        await nc.close()
