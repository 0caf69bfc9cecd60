"""`edgevm node up --hub URL --creds FILE` with bad input: a clear message, and the node runs on its own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nats
import pytest

from edgevm.cli.fleetca import ensure_ca
from edgevm.cli.natsserver import free_port
from edgevm.cli.secretfile import write_secret
from edgevm.shared.client import Client
from tests.fleet.conftest import Hub, Node
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
async def run_node(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    """Start a node `name` with `--hub url --creds path`; every node started is stopped at the end."""
    started: list[Node] = []

    async def start(name: str, hub_url: str, creds: Path) -> Node:
        node = Node(name, tmp_path / name, tmp_path / f"{name}.log", None, creds, hub_url)
        started.append(node)
        await asyncio.to_thread(node.start)
        return node

    yield start
    for node in started:
        await asyncio.to_thread(node.stop)
        await asyncio.to_thread(node.remove_netns)


async def answers_locally(node: Node) -> None:
    """Wait until the node answers its own commands on its own NATS."""
    nc = await nats.connect(node.url)
    try:
        await eventually(lambda: Client(nc, node.name, timeout=2).call("vm.list"), timeout=60,
                         what=f"node {node.name} answers locally")
    finally:
        await nc.close()


async def says(node: Node, text: str, timeout: float = 30) -> None:
    await eventually(lambda: asyncio.sleep(0, text in node.output()), timeout=timeout,
                     what=f"node {node.name} says {text!r}")


async def test_a_hub_that_is_not_there(lone_hub: Hub, run_node: Callable, tmp_path: Path) -> None:
    added = await asyncio.to_thread(lone_hub.fleet, "add-node", "far", "--out", str(tmp_path / "far.creds"))
    assert added.returncode == 0, added.stderr
    nobody = free_port()
    node = await run_node("far", f"nats-leaf://127.0.0.1:{nobody}", tmp_path / "far.creds")
    await answers_locally(node)
    await says(node, f"hub link cannot reach the hub nats-leaf://127.0.0.1:{nobody}")
    assert "connection refused" in node.output()


async def test_credentials_the_hub_does_not_know(lone_hub: Hub, run_node: Callable, tmp_path: Path) -> None:
    creds = tmp_path / "gone.creds"
    assert (await asyncio.to_thread(lone_hub.fleet, "add-node", "gone", "--out", str(creds))).returncode == 0
    assert (await asyncio.to_thread(lone_hub.fleet, "remove-node", "gone")).returncode == 0
    node = await run_node("gone", f"nats-leaf://127.0.0.1:{lone_hub.leaf_port}", creds)
    await answers_locally(node)
    await says(node, "hub link refused by the hub")
    assert "Authorization Violation" in node.output()
    # nats-server retries by itself: the hub sees the node try again and again.
    hub_log = lone_hub.state / "nats.log"
    refused = "Leafnode connection closed: Authentication Failure"
    await eventually(lambda: asyncio.sleep(0, hub_log.read_text().count(refused) >= 3),
                     timeout=30, what="three refused attempts at the hub")
    assert node.output().count("hub link refused") == 1, "told once, not at every retry"
    assert "hub link up" not in node.output()
    assert json.loads(creds.read_text())["seed"] not in node.output() + hub_log.read_text() + lone_hub.log.read_text()
    assert creds.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("case", "expected"), [
    ("missing", "no such file"),
    ("not-json", "not an edgevm fleet credentials file"),
    ("other-node", "belongs to node 'someone'"),
])
async def test_a_creds_file_that_cannot_be_used(lone_hub: Hub, run_node: Callable, tmp_path: Path, case: str,
                                               expected: str) -> None:
    creds = tmp_path / "node.creds"
    if case == "not-json":
        creds.write_text("SUAM...not a creds file\n")
    elif case == "other-node":
        assert (await asyncio.to_thread(lone_hub.fleet, "add-node", "someone", "--out", str(creds))).returncode == 0
    node = await run_node("lonely", f"nats-leaf://127.0.0.1:{lone_hub.leaf_port}", creds)
    await answers_locally(node)
    text = node.output()
    assert "NOT joining the fleet" in text and expected in text and "running on its own" in text


async def test_a_hub_certificate_from_another_ca_is_refused(lone_hub: Hub, run_node: Callable, tmp_path: Path) -> None:
    creds = tmp_path / "wary.creds"
    assert (await asyncio.to_thread(lone_hub.fleet, "add-node", "wary", "--out", str(creds))).returncode == 0
    other_ca, _ = ensure_ca(tmp_path / "other-ca")
    data = json.loads(creds.read_text())
    write_secret(creds, json.dumps({**data, "ca": other_ca.read_text()}))
    node = await run_node("wary", f"nats-leaf://127.0.0.1:{lone_hub.leaf_port}", creds)
    await answers_locally(node)
    await says(node, "hub link TLS with the hub")
    assert "hub link up" not in node.output()
    assert (node.state / "nats" / "nats-server.conf").stat().st_mode & 0o777 == 0o600, "it holds the node's seed"
