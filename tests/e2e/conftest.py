"""`edgevm node up` as a user starts it, in a network namespace of its own, for the end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgevm.cli.natsserver import free_port, wait_for_port
from edgevm.shared.config import SERVICES
from tests.helpers import mark_needing_root


@dataclass(frozen=True)
class World:
    """The node's network namespace and the prefix of its VRF namespaces."""

    netns: str
    prefix: str


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every end-to-end test needs root: the node's namespaces, nftables, libvirt (tests/conftest.py checks it)."""
    mark_needing_root(items, Path(__file__).parent)


@contextlib.contextmanager
def node_world_made() -> Iterator[World]:
    """A namespace of its own for a node's network, removed afterwards with every VRF namespace under its prefix."""
    tag = secrets.token_hex(3)
    world = World(f"edgevm-t-e2e-{tag}", f"edgevm-t-e2e{tag}-")
    subprocess.run(["ip", "netns", "add", world.netns], check=True)
    try:
        yield world
    finally:
        for name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
            if name == world.netns or name.startswith(world.prefix):
                subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def node_world() -> Iterator[World]:
    """A namespace of its own for the node's network (netplumb and flowwatch plumb and watch it, not the host's)."""
    with node_world_made() as world:
        yield world


def free_port_run(count: int) -> int:
    """Return the first of `count` consecutive ports free on 127.0.0.1 right now."""
    for _ in range(50):
        base = free_port()
        sockets = [socket.socket() for _ in range(count)]
        try:
            for offset, sock in enumerate(sockets):
                sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports found")


@dataclass
class NodeUp:
    """A running `edgevm node up` of node `e2e`: its process, NATS port, metrics base port and log."""

    process: subprocess.Popen[bytes]
    nats_port: int
    metrics_base: int
    log: Path

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, as Ctrl-C would; killed if it does not end within `timeout` seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_node_up(state: Path, log: Path, world: World | None, env: dict[str, str] | None = None,
                  node: str = "e2e") -> NodeUp:
    """Start `edgevm node up` (libvirt's test driver, the node's network in `world`) until NATS listens.

    `world` None leaves the node in the host's namespace (where libvirt makes a real guest's tap).
    `env` overrides the environment; when it sets EDGEVM_METRICS_BASE_PORT, no --metrics-base-port flag is given.
    The launcher leads a process group of its own, as a shell's foreground job does (Ctrl-C is `killpg`).
    """
    where = {} if world is None else {"EDGEVM_NODE_NETNS": world.netns, "EDGEVM_NETNS_PREFIX": world.prefix}
    env = {**os.environ, "EDGEVM_LIBVIRT_URI": "test:///default", **where, **(env or {})}
    env.pop("EDGEVM_METRICS_PORT", None)
    flags = []
    if "EDGEVM_METRICS_BASE_PORT" in env:
        metrics_base = int(env["EDGEVM_METRICS_BASE_PORT"])
    else:
        metrics_base = free_port_run(len(SERVICES))
        flags = ["--metrics-base-port", str(metrics_base)]
    nats_port = free_port()
    while metrics_base <= nats_port < metrics_base + len(SERVICES):
        nats_port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "edgevm"), "--node", node, "node", "up", "--state-dir", str(state),
         "--nats-port", str(nats_port), *flags],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        wait_for_port("127.0.0.1", nats_port, 20)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return NodeUp(process, nats_port, metrics_base, log)
