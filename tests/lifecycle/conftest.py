"""A lifecycle service in this process on libvirt's test driver, driven over real NATS."""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from edgevm.cli.natsserver import NatsServer
from edgevm.lifecycle.app import setup
from edgevm.shared.client import Client
from edgevm.shared.config import Config
from edgevm.shared.runtime import serve
from tests.helpers import eventually

# QEMU runs as its own user: a VM's files must be reachable by it, so no 0700 pytest temp dirs here.
STATE_BASE = Path(os.environ.get("EDGEVM_TEST_STATE", "/var/tmp/edgevm-tests"))


def state_dir() -> Path:
    """Return a fresh state directory that QEMU's user can walk into."""
    STATE_BASE.mkdir(parents=True, exist_ok=True)
    os.chmod(STATE_BASE, 0o755)
    path = Path(tempfile.mkdtemp(dir=STATE_BASE))
    os.chmod(path, 0o755)
    return path


@dataclass
class Node:
    """A running lifecycle service of one node."""

    client: Client
    config: Config
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def import_dir(self) -> Path:
        return self.config.state_dir / "import"

    def make_image_file(self, name: str, size: str = "64M", fmt: str = "qcow2") -> Path:
        """Create a small disk image in the node's import dir."""
        self.import_dir.mkdir(parents=True, exist_ok=True)
        path = self.import_dir / name
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True)
        return path

    async def shutdown(self) -> None:
        """Stop the service (a second call does nothing)."""
        self.stop.set()
        await asyncio.wait_for(self.task, 30)


def private_test_uri(state: Path) -> str:
    """Return a libvirt test-driver URI private to each opening.

    `test:///default` is shared by every connection of a process while any of them lives, so one test's
    domains could show up in another's; a test driver loaded from a file starts empty at every opening.
    """
    path = state / "libvirt-test-node.xml"
    path.write_text("<node/>")
    return f"test://{path}"


async def start_node(nats_server: NatsServer, nc: NATS, uri: str | None = None,
                     state: Path | None = None, node: str | None = None, network: str = "none") -> Node:
    """Start a lifecycle service in this process (on a private test driver by default) until it answers.

    Without netplumb by default (`network="none"`: VMs get no NIC); pass "netplumb" when a netplumb
    service of the same node runs too.
    """
    state = state or state_dir()
    config = Config(
        node=node or f"n{uuid.uuid4().hex[:8]}",
        nats_url=nats_server.url,
        state_dir=state,
        libvirt_uri=uri or private_test_uri(state),
        metrics_host="127.0.0.1",
        metrics_base_port=0,
        metrics_port=0,
        log_level="INFO",
        network=network,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(serve("lifecycle", setup, config, stop))
    client = Client(nc, config.node)

    async def ready() -> bool:
        if task.done():
            task.result()
        await client.call("vm.list")
        return True

    await eventually(ready, timeout=60, what="lifecycle answers")
    return Node(client, config, stop, task)


@pytest.fixture
async def node(nats_server: NatsServer, nc: NATS) -> AsyncIterator[Node]:
    """A lifecycle service on a private libvirt test driver for one test."""
    running = await start_node(nats_server, nc)
    yield running
    await running.shutdown()
