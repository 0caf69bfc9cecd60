"""Simulated nodes for the gateway tests: what a node's services publish, on a real nats-server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from pathlib import Path

from nats.aio.client import Client as NATS

from edgevm.cli.natsserver import NatsServer
from edgevm.shared.client import Client
from edgevm.shared.clock import now
from edgevm.shared.commands import NodeList
from edgevm.shared.events import FlowClosed, FlowOpened, TaskUpdated, VmCreated
from edgevm.shared.heartbeat import beat_forever
from edgevm.shared.ids import new_id
from edgevm.shared.objects import Flow, Task, Vm, VmStatus
from edgevm.shared.publisher import EventPublisher
from edgevm.shared.spec import VmSpec
from tests.helpers import ServiceProcess

TIMEOUT = 2.0
BEAT = 0.3


def vm(name: str, state: str = "running") -> Vm:
    return Vm(VmSpec(name=name, image="img", memory=512 * 1024**2), VmStatus(state, 1, now(), now()))  # type: ignore[arg-type]


def flow(node: str, vm_name: str, status: str) -> Flow:
    return Flow(new_id(), node, vm_name, "tcp", "10.0.0.2", 40000, "10.0.0.9", 443, "outbound", status, now())  # type: ignore[arg-type]


async def cancel(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait for its end, cancelling again if a cancellation got lost.

    Python 3.11's `asyncio.wait_for` drops a cancellation that arrives just as its inner awaitable is done
    (fixed in 3.12), and nats-py's `publish_async` waits in one: a heartbeat loop cancelled mid-publish
    may then carry on.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1)


class FakeNode:
    """A node's event side: what its services publish (VM, task and flow events, heartbeats)."""

    def __init__(self, nc: NATS, name: str) -> None:
        self.name = name
        self.js = nc.jetstream()
        self.publisher = EventPublisher(self.js, name, "lifecycle")
        self.beating: asyncio.Task[None] | None = None

    def start_beating(self) -> None:
        self.beating = asyncio.create_task(beat_forever(self.publisher, self.name, "lifecycle", interval=BEAT))

    async def stop_beating(self) -> None:
        assert self.beating is not None
        await cancel(self.beating)
        await self.publisher.flush()

    async def publish_objects(self) -> tuple[Task, Task]:
        """Publish two VMs, a task for each and an active and a completed flow of the first VM."""
        for name in ("web", "db"):
            await self.publisher.publish(VmCreated(at=now(), vm=vm(name)))
        tasks = (Task(new_id(), self.name, "vm.start", "succeeded", now(), vm="web", progress=100),
                 Task(new_id(), self.name, "vm.start", "failed", now(), vm="db", error="boom"))
        for task in tasks:
            await self.publisher.publish(TaskUpdated(at=now(), task=task))
        await self.publisher.publish(FlowOpened(at=now(), flow=flow(self.name, "web", "active")))
        await self.publisher.publish(FlowClosed(at=now(), flow=flow(self.name, "web", "completed")))
        await self.publisher.flush()
        return tasks


def gateway_process(server: NatsServer, tmp_path: Path) -> ServiceProcess:
    env = {"EDGEVM_NATS_URL": server.url, "EDGEVM_NODE": f"gw{uuid.uuid4().hex[:6]}",
           "EDGEVM_GW_NODE_TIMEOUT": str(TIMEOUT)}
    return ServiceProcess("gateway", env, tmp_path / "gateway.log")


async def states(client: Client, *names: str) -> dict[str, str]:
    reply = await client.gateway("node.list", {}, NodeList)
    return {n.node: n.state for n in reply.nodes if n.node in names}


async def equals(pending: Awaitable[object], expected: object) -> bool:
    """Await `pending` and compare it with `expected` (for `eventually`)."""
    return await pending == expected
