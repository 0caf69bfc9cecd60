"""A fleet on loopback: `edgevm hub up` and nodes joined by `edgevm node up --hub`, as a user starts them.

Each node runs in its own process group with networking off; node `a` on qemu:///system (its snapshotter must
see the domains its lifecycle made, which libvirt's per-process test driver cannot give), `b` on the test
driver. Each node's uplink goes through a TCP relay the tests can cut. VM names carry a random suffix.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from edgevm.cli.natsserver import free_port, wait_for_port
from edgevm.shared.client import Client
from tests.e2e.conftest import free_port_run
from tests.fleet.relay import Relay
from tests.helpers import eventually
from tests.lifecycle.conftest import STATE_BASE, state_dir

EDGEVM = str(Path(sys.executable).parent / "edgevm")


def _stop_group(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM the process group `process` leads, SIGKILL it if it does not end."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class Hub:
    """A running `edgevm hub up`."""

    state: Path
    nats_port: int
    leaf_port: int
    metrics_port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [EDGEVM, "hub", "up", "--state-dir", str(self.state), "--listen", "127.0.0.1", "--nats-port",
             str(self.nats_port), "--leaf-port", str(self.leaf_port), "--metrics-port", str(self.metrics_port)],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "EDGEVM_GW_NODE_TIMEOUT": "30"},
        )
        wait_for_port("127.0.0.1", self.nats_port, 30, None)

    def stop(self) -> None:
        if self.process is not None:
            _stop_group(self.process)

    def fleet(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `edgevm fleet ARGS --state-dir <the hub's>`."""
        return subprocess.run([EDGEVM, "fleet", *args, "--state-dir", str(self.state)], capture_output=True,
                              text=True, timeout=60)


@dataclass
class Node:
    """A running `edgevm node up --hub` whose uplink goes through `relay`."""

    name: str
    state: Path
    log: Path
    relay: Relay | None
    creds: Path | None
    hub_url: str | None = None
    nats_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    netns: str = field(default_factory=lambda: f"edgevm-t-fl-{secrets.token_hex(3)}")
    libvirt_uri: str = "test:///default"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    def start(self) -> None:
        metrics = free_port_run(5)
        # netplumb and flowwatch plumb and watch a namespace of the node's own, not the host's.
        if self.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout:
            subprocess.run(["ip", "netns", "add", self.netns], check=True)
        env = {**os.environ, "EDGEVM_LIBVIRT_URI": self.libvirt_uri, "EDGEVM_NETWORK": "none",
               "EDGEVM_NODE_NETNS": self.netns, "EDGEVM_NETNS_PREFIX": f"{self.netns}-"}
        env.pop("EDGEVM_METRICS_PORT", None)
        args = [EDGEVM, "--node", self.name, "node", "up", "--state-dir", str(self.state), "--nats-port",
                str(self.nats_port), "--metrics-base-port", str(metrics)]
        if self.hub_url is not None and self.creds is not None:
            args += ["--hub", self.hub_url, "--creds", str(self.creds)]
        self.process = subprocess.Popen(args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        wait_for_port("127.0.0.1", self.nats_port, 30, None)

    def stop(self) -> None:
        if self.process is not None:
            _stop_group(self.process)

    async def delete_vms(self) -> None:
        """Delete every VM of the node (through its own NATS), so no domain outlives the test."""
        if self.process is None or self.process.poll() is not None:
            return
        nc = await nats.connect(self.url, connect_timeout=3)
        try:
            client = Client(nc, self.name, timeout=15)
            for vm in (await client.call("vm.list"))["vms"]:
                name = vm["spec"]["name"]
                with contextlib.suppress(Exception):  # a VM that is not running cannot be stopped
                    await wait_task(client, (await client.call("vm.stop", {"name": name, "force": True}))["task"]["id"])
                await wait_task(client, (await client.call("vm.delete", {"name": name}))["task"]["id"])
        finally:
            await nc.close()

    def remove_netns(self) -> None:
        for name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
            if name == self.netns or name.startswith(f"{self.netns}-"):
                subprocess.run(["ip", "netns", "del", name], check=False)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Fleet:
    """A hub, its nodes and an operator's seed file."""

    hub: Hub
    nodes: dict[str, Node]
    operator_seed: Path
    tmp: Path

    async def operator(self) -> NATS:
        """Connect to the hub as the operator."""
        return await nats.connect(self.hub.url, nkeys_seed=str(self.operator_seed), connect_timeout=5)

    async def admin(self) -> NATS:
        """Connect to the hub as the hub's own identity (reads its streams)."""
        return await nats.connect(self.hub.url, nkeys_seed=str(self.hub.state / "keys" / "admin.seed"))


async def start_node(tmp: Path, hub: Hub, name: str, relay: bool = True, libvirt_uri: str = "test:///default") -> Node:
    """Add node `name` to the fleet and start it with its uplink through a relay."""
    creds = tmp / f"{name}.creds"
    added = await asyncio.to_thread(hub.fleet, "add-node", name, "--out", str(creds))
    assert added.returncode == 0, added.stderr
    link = Relay(hub.leaf_port) if relay else None
    if link is not None:
        await link.open()
    port = link.port if link is not None else hub.leaf_port
    # QEMU runs as its own user: a node on qemu:///system keeps its state where that user can reach it.
    state = state_dir() if libvirt_uri.startswith("qemu:") else tmp / name
    node = Node(name, state, tmp / f"{name}.log", link, creds, f"nats-leaf://127.0.0.1:{port}",
                libvirt_uri=libvirt_uri)
    await asyncio.to_thread(node.start)
    return node


async def prepare_image(client: Client, state: Path) -> None:
    """Import a small qcow2 image `base` on the node whose state directory is `state`."""
    (state / "import").mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(subprocess.run, ["qemu-img", "create", "-q", "-f", "qcow2",
                                             str(state / "import" / "base.qcow2"), "16M"], check=True)
    reply = await client.call("image.import", {"name": "base", "path": "base.qcow2"})
    await wait_task(client, reply["task"]["id"])


async def wait_task(client: Client, task_id: str, timeout: float = 30) -> dict:
    """Wait until task `task_id` succeeded; return it."""
    async def done() -> dict | None:
        task = await client.call("task.get", {"id": task_id})
        assert task["status"] != "failed", task["error"]
        return task if task["status"] == "succeeded" else None

    return await eventually(done, timeout=timeout, what=f"task {task_id} succeeded")


@pytest.fixture(scope="module")
async def fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    """A hub and two nodes, `a` and `b`, each joined through a relay; an operator."""
    tmp = tmp_path_factory.mktemp("fleet")
    hub = Hub(tmp / "hub", free_port(), free_port(), free_port(), tmp / "hub.log")
    nodes: dict[str, Node] = {}
    try:
        await asyncio.to_thread(hub.start)
        added = await asyncio.to_thread(hub.fleet, "add-operator", "ops", "--out", str(tmp / "ops.seed"))
        assert added.returncode == 0, added.stderr
        nodes["a"] = await start_node(tmp, hub, "a", libvirt_uri="qemu:///system")
        nodes["b"] = await start_node(tmp, hub, "b")
        yield Fleet(hub, nodes, tmp / "ops.seed", tmp)
    finally:
        for node in nodes.values():
            try:
                await node.delete_vms()
            except Exception as exc:  # the teardown goes on; the leftover is named
                print(f"node {node.name}: its VMs could not all be deleted: {exc!r}")
            await asyncio.to_thread(node.stop)
            await asyncio.to_thread(node.remove_netns)
            if node.state.is_relative_to(STATE_BASE):
                shutil.rmtree(node.state, ignore_errors=True)
            if node.relay is not None:
                await node.relay.cut()
        await asyncio.to_thread(hub.stop)


# VM names of this run: node a's domains live in the host's libvirt, beside other runs'.
TAG = secrets.token_hex(3)


def vm_name(base: str) -> str:
    """Return `base` with this run's suffix."""
    return f"{base}-{TAG}"


@pytest.fixture(scope="module")
async def lone_hub(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Hub]:
    """A hub with no node yet."""
    tmp = tmp_path_factory.mktemp("hub")
    hub = Hub(tmp / "hub", free_port(), free_port(), free_port(), tmp / "hub.log")
    try:
        await asyncio.to_thread(hub.start)
        yield hub
    finally:
        await asyncio.to_thread(hub.stop)
