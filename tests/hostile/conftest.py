"""One running node for the hostile-input tests: `edgevm node up` as a user starts it (embedded NATS, libvirt's
test driver, the node's network in a namespace of its own), holding an image, a VRF, a VM and a task."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from edgevm.cli.supervisor import installed_services
from edgevm.shared.client import Client
from tests.e2e.conftest import NodeUp, World, start_node_up
from tests.e2e.test_node_up import ping_names
from tests.helpers import eventually


@dataclass
class HostileNode:
    """The node under attack: its `node up`, a client, and where its state lives."""

    node: NodeUp
    nc: NATS
    client: Client
    state: Path
    services: list[str]

    def log(self) -> str:
        """Return what `node up` and its services printed so far."""
        return self.node.log.read_text(errors="replace")


async def _answers(url: str, names: set[str]) -> bool:
    return names <= await ping_names(url)


async def _task_succeeded(client: Client, task_id: str) -> bool:
    task = await client.call("task.get", {"id": task_id})
    assert task["status"] != "failed", task["error"]
    return task["status"] == "succeeded"


@pytest.fixture(scope="module")
def hostile_node_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeUp, Path]]:
    """`edgevm node up` with the node's network in a namespace of its own; its state directory."""
    tag = secrets.token_hex(3)
    world = World(f"edgevm-t-hx-{tag}", f"edgevm-t-hx{tag}-")
    subprocess.run(["ip", "netns", "add", world.netns], check=True)
    root = tmp_path_factory.mktemp("hostile")
    try:
        node = start_node_up(root / "state", root / "node.log", world)
        try:
            yield node, root / "state"
        finally:
            node.process.terminate()
            try:
                node.process.wait(30)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()
    finally:
        for name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
            if name == world.netns or name.startswith(world.prefix):
                subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="module")
async def hostile_node(hostile_node_up: tuple[NodeUp, Path]) -> AsyncIterator[HostileNode]:
    """The node, with image `base`, VRF `blue` and VM `web` (and the import's task) in place."""
    node, state = hostile_node_up
    services = installed_services()
    await eventually(lambda: _answers(node.url, {f"edgevm-{s}" for s in services}), timeout=60,
                     what="every service answers $SRV.PING")
    nc = await nats.connect(node.url)
    try:
        client = Client(nc, "e2e", timeout=15)
        (state / "import").mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(subprocess.run, ["qemu-img", "create", "-q", "-f", "qcow2",
                                                 str(state / "import" / "base.qcow2"), "16M"], check=True)
        imported = await client.call("image.import", {"name": "base", "path": "base.qcow2"})
        await eventually(lambda: _task_succeeded(client, imported["task"]["id"]), timeout=30, what="import")
        await client.call("net.vrf.create", {"name": "blue", "subnet": "10.44.0.0/24"})
        await client.call("vm.create", {"name": "web", "image": "base", "network": {"vrf": "blue"}})
        yield HostileNode(node, nc, client, state, services)
    finally:
        await nc.close()
