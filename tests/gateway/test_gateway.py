"""The gateway over a real nats-server: the read model, its queries, and replay after its own downtime."""

from __future__ import annotations

import uuid
from pathlib import Path

from nats.aio.client import Client as NATS

from edgevm.cli.natsserver import NatsServer
from edgevm.shared.bus import ensure_jetstream
from edgevm.shared.client import Client
from edgevm.shared.clock import now
from edgevm.shared.commands import GwVmList, NodeList, TaskList
from edgevm.shared.events import Heartbeat, TaskUpdated, VmCreated, VmDeleted
from edgevm.shared.ids import new_id
from edgevm.shared.objects import Task, Vm, VmStatus
from edgevm.shared.publisher import EventPublisher
from edgevm.shared.spec import VmSpec
from tests.helpers import ServiceProcess, eventually


def vm(name: str) -> Vm:
    return Vm(VmSpec(name=name, image="img", memory=512 * 1024**2), VmStatus("defined", 1, now(), now()))


async def test_gateway_replays_events_published_while_it_was_down(
    nc: NATS, nats_server: NatsServer, tmp_path: Path
) -> None:
    js = nc.jetstream()
    await ensure_jetstream(js)
    node = f"gw{uuid.uuid4().hex[:8]}"
    pub = EventPublisher(js, node, "test")
    client = Client(nc, node)
    await pub.publish(VmCreated(at=now(), vm=vm("early")))
    await pub.publish(Heartbeat(at=now(), node=node, services=["lifecycle"], cpus=2, memory_bytes=1 << 30))

    gateway = ServiceProcess("gateway", {"EDGEVM_NATS_URL": nats_server.url, "EDGEVM_NODE": "gw"},
                             tmp_path / "gateway.log").start()
    try:
        async def sees(names: set[str]) -> bool:
            reply = await client.gateway("vm.list", {"node": node}, GwVmList)
            return {v.spec.name for v in reply.vms} == names

        await eventually(lambda: sees({"early"}), what="gateway shows the VM created before it started")
        nodes = await client.gateway("node.list", {}, NodeList)
        mine = next(n for n in nodes.nodes if n.node == node)
        assert (mine.state, mine.vms, mine.services) == ("up", 1, ["lifecycle"])
    finally:
        assert gateway.stop() == 0, gateway.log()

    # While the gateway is down: one VM goes, another comes, a task runs.
    await pub.publish(VmDeleted(at=now(), vm=vm("early")))
    await pub.publish(VmCreated(at=now(), vm=vm("late")))
    task = Task(new_id(), node, "vm.start", "succeeded", now(), vm="late", progress=100)
    await pub.publish(TaskUpdated(at=now(), task=task))

    gateway.start()
    try:
        await eventually(lambda: sees({"late"}), what="gateway replays what happened while it was down")
        tasks = await client.gateway("task.list", {"node": node}, TaskList)
        assert [t.id for t in tasks.tasks] == [task.id]
    finally:
        assert gateway.stop() == 0, gateway.log()
