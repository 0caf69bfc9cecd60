"""The gateway over several nodes' events on a real nats-server: node states, kept objects, filters, restart.

Each node publishes as a real node does: one EventPublisher per service and the services' heartbeat loop
(here every 0.3 s, with the gateway's timeout set to 2 s by EDGEVM_GW_NODE_TIMEOUT).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from edgevm.cli.natsserver import NatsServer
from edgevm.shared.client import Client
from edgevm.shared.commands import GwFlowList, GwTaskList, GwVmList, NodeInfo, NodeList
from edgevm.shared.errors import RemoteError
from tests.gateway.nodes import BEAT, TIMEOUT, FakeNode, equals, gateway_process, states
from tests.helpers import eventually


async def test_nodes_go_unreachable_without_heartbeats_and_their_objects_stay_marked(
    nc: NATS, nats_server: NatsServer, fleet: tuple[FakeNode, FakeNode], tmp_path: Path
) -> None:
    a, b = fleet
    client = Client(nc, "unused")
    tasks_a = await a.publish_objects()
    await b.publish_objects()
    a.start_beating()
    b.start_beating()
    gateway = gateway_process(nats_server, tmp_path).start()
    try:
        both_up = {a.name: "up", b.name: "up"}
        await eventually(lambda: equals(states(client, a.name, b.name), both_up), what="both nodes up")
        nodes = {n.node: n for n in (await client.gateway("node.list", {}, NodeList)).nodes}
        assert (nodes[a.name].vms, nodes[a.name].services) == (2, ["lifecycle"])

        await a.stop_beating()
        cut = asyncio.get_running_loop().time()
        a_down = {a.name: "unreachable", b.name: "up"}
        await eventually(lambda: equals(states(client, a.name, b.name), a_down), timeout=TIMEOUT + 8,
                         what="node a unreachable, b still up")
        assert asyncio.get_running_loop().time() - cut >= TIMEOUT - BEAT, "not before the timeout"

        vms = (await client.gateway("vm.list", {}, GwVmList)).vms
        mine = sorted((v.node, v.spec.name, v.status.state, v.node_state) for v in vms if v.node in (a.name, b.name))
        assert mine == [(a.name, "db", "running", "unreachable"), (a.name, "web", "running", "unreachable"),
                        (b.name, "db", "running", "up"), (b.name, "web", "running", "up")]
        tasks = (await client.gateway("task.list", {"node": a.name}, GwTaskList)).tasks
        assert [(t.id, t.node_state) for t in tasks] == [(tasks_a[1].id, "unreachable"), (tasks_a[0].id, "unreachable")]
        flows = (await client.gateway("flow.list", {"node": a.name}, GwFlowList)).flows
        assert {(f.status, f.node_state) for f in flows} == {("active", "unreachable"), ("completed", "unreachable")}

        a.start_beating()
        await eventually(lambda: equals(states(client, a.name, b.name), both_up), what="node a back up")
        vms = (await client.gateway("vm.list", {"node": a.name}, GwVmList)).vms
        assert {v.node_state for v in vms} == {"up"}
    finally:
        assert gateway.stop() == 0, gateway.log()


async def test_filters_of_the_fleet_queries(
    nc: NATS, nats_server: NatsServer, fleet: tuple[FakeNode, FakeNode], tmp_path: Path
) -> None:
    a, b = fleet
    client = Client(nc, "unused")
    tasks_a = await a.publish_objects()
    tasks_b = await b.publish_objects()
    gateway = gateway_process(nats_server, tmp_path).start()
    try:
        await eventually(lambda: _count_vms(client, b.name, 2), what="gateway replayed both nodes")
        vms = (await client.gateway("vm.list", {"node": a.name}, GwVmList)).vms
        assert [(v.node, v.spec.name) for v in vms] == [(a.name, "db"), (a.name, "web")]
        assert (await client.gateway("vm.list", {"node": "nosuchnode"}, GwVmList)).vms == []

        ours = {t.id for t in tasks_a + tasks_b}
        every = (await client.gateway("task.list", {"limit": 500}, GwTaskList)).tasks
        assert [t.id for t in every if t.id in ours] == sorted(ours, reverse=True), "newest first, all nodes"
        by_vm = (await client.gateway("task.list", {"node": b.name, "vm": "db"}, GwTaskList)).tasks
        assert [(t.id, t.status) for t in by_vm] == [(tasks_b[1].id, "failed")]
        one = (await client.gateway("task.list", {"node": a.name, "limit": 1}, GwTaskList)).tasks
        assert [t.id for t in one] == [tasks_a[1].id]

        active = (await client.gateway("flow.list", {"node": b.name, "status": "active"}, GwFlowList)).flows
        assert [(f.node, f.vm, f.status) for f in active] == [(b.name, "web", "active")]
        done = (await client.gateway("flow.list", {"node": b.name, "vm": "web", "status": "completed"}, GwFlowList))
        assert [f.status for f in done.flows] == ["completed"]
        assert (await client.gateway("flow.list", {"node": b.name, "vm": "db"}, GwFlowList)).flows == []

        with pytest.raises(RemoteError) as bad:
            await client.gateway("task.list", {"node": "Not_A_Node"}, GwTaskList)
        assert (bad.value.code, bad.value.field) == ("400", "node")
        with pytest.raises(RemoteError) as bad:
            await client.gateway("flow.list", {"status": "open"}, GwFlowList)
        assert (bad.value.code, bad.value.field) == ("400", "status")
    finally:
        assert gateway.stop() == 0, gateway.log()


async def test_a_restart_replays_old_heartbeats_without_making_a_silent_node_up(
    nc: NATS, nats_server: NatsServer, fleet: tuple[FakeNode, FakeNode], tmp_path: Path
) -> None:
    a, b = fleet
    client = Client(nc, "unused")
    await a.publish_objects()
    a.start_beating()
    await asyncio.sleep(3 * BEAT)
    await a.stop_beating()  # a's last heartbeat is now in the stream, and it ages
    await asyncio.sleep(TIMEOUT + 0.5)
    b.start_beating()
    gateway = gateway_process(nats_server, tmp_path).start()
    try:
        await eventually(lambda: _count_vms(client, a.name, 2), what="gateway replayed a's VMs")
        # Right after the replay: with heartbeats judged by their arrival, a would show up for TIMEOUT s.
        assert await states(client, a.name) == {a.name: "unreachable"}
        await eventually(lambda: equals(states(client, b.name), {b.name: "up"}), what="b up")
        assert await states(client, a.name) == {a.name: "unreachable"}
        assert (await _node(client, a.name)).last_seen != ""
    finally:
        assert gateway.stop() == 0, gateway.log()



async def _count_vms(client: Client, node: str, count: int) -> bool:
    return len((await client.gateway("vm.list", {"node": node}, GwVmList)).vms) == count


async def _node(client: Client, name: str) -> NodeInfo:
    return next(n for n in (await client.gateway("node.list", {}, NodeList)).nodes if n.node == name)
