"""A snapshotter service beside a lifecycle service of the same node, both in this process, over real NATS."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from nats.aio.client import Client as NATS

from edgevm.cli.natsserver import NatsServer
from edgevm.shared.client import Client
from edgevm.shared.config import Config
from edgevm.shared.errors import RemoteError
from edgevm.shared.runtime import serve
from edgevm.snapshotter.app import make_setup
from tests.helpers import eventually
from tests.lifecycle.conftest import Node, start_node

# libvirt's test driver is shared by every connection of this process while one is open (a private
# test:///<file> URI would give each service its own empty driver), so both services see the same domains;
# each test names its VMs uniquely.
SHARED_TEST_URI = "test:///default"


@dataclass
class Snapshotter:
    """A running snapshotter service."""

    config: Config
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def shutdown(self) -> None:
        """Stop the service (a second call does nothing)."""
        self.stop.set()
        await asyncio.wait_for(self.task, 90)


async def start_snapshotter(nc: NATS, config: Config, workers: int = 2) -> Snapshotter:
    """Start a snapshotter in this process for `config`'s node, until it answers."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve("snapshotter", make_setup(workers), config, stop))
    client = Client(nc, config.node)

    async def ready() -> bool:
        if task.done():
            task.result()
        return await _answers(client)

    await eventually(ready, timeout=60, what="snapshotter answers")
    return Snapshotter(config, stop, task)


async def _answers(client: Client) -> bool:
    try:
        await client.call("snapshot.list", {"vm": "no-such-vm-ping"})
    except RemoteError as error:
        return error.code == "404"
    return True


@dataclass
class Pair:
    """A lifecycle and a snapshotter service of one node."""

    node: Node
    snapshotter: Snapshotter

    @property
    def client(self) -> Client:
        return self.node.client


@pytest.fixture
async def pair(nats_server: NatsServer, nc: NATS) -> AsyncIterator[Pair]:
    """Lifecycle and snapshotter of a fresh node on libvirt's shared test driver."""
    node = await start_node(nats_server, nc, uri=SHARED_TEST_URI)
    snapshotter = await start_snapshotter(nc, node.config)
    yield Pair(node, snapshotter)
    await snapshotter.shutdown()
    await node.shutdown()


def unique(prefix: str) -> str:
    """A VM name no other test of the session uses."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"
