"""`edgevm node up` starting and stopping as scripts and users see it: listed means serving, Ctrl-C, ports."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS

from edgevm.cli.supervisor import installed_services
from edgevm.shared import subjects
from edgevm.shared.config import SERVICES
from tests.e2e.conftest import NodeUp, World, free_port_run, node_world_made, start_node_up
from tests.e2e.test_node_up import alive, children_of
from tests.helpers import eventually

# One read-only command per service, sent the moment $SRV.PING lists the service. A 404 is an answer too.
PROBES = {
    "edgevm-lifecycle": ("vm.list", {}),
    "edgevm-netplumb": ("net.vrf.list", {}),
    "edgevm-snapshotter": ("snapshot.list", {"vm": "nothing-here"}),
    "edgevm-flowwatch": ("flow.list", {"vm": "nothing-here"}),
    "edgevm-gateway": ("gw.node.list", {}),
}


def stop_node(node: NodeUp, sig: int = signal.SIGTERM) -> int:
    """Signal the launcher's process group (as a terminal's Ctrl-C does) and wait for it; return its code."""
    if node.process.poll() is None:
        os.killpg(node.process.pid, sig)
        try:
            node.process.wait(40)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()
    return node.process.returncode


async def command_each_when_listed(url: str, node: str, names: set[str], timeout: float = 60) -> dict[str, str]:
    """Ping discovery every 20 ms; command each service the moment it is listed; return how each answered."""
    nc = await nats.connect(url)
    outcomes: dict[str, str] = {}
    probes: list[asyncio.Task[None]] = []

    async def probe(name: str) -> None:
        verb, body = PROBES[name]
        subject = subjects.gateway(verb[3:]) if verb.startswith("gw.") else subjects.command(node, verb)
        try:
            await nc.request(subject, json.dumps(body).encode(), timeout=15)
            outcomes[name] = "answered"
        except nats.errors.NoRespondersError:
            outcomes[name] = "no responders"

    async def on_pong(msg: nats.aio.msg.Msg) -> None:
        if not msg.data:  # the server's "no responders" status: nothing is listed yet
            return
        name = json.loads(msg.data)["name"]
        if name in names and name not in outcomes:
            outcomes[name] = "sent"
            probes.append(asyncio.create_task(probe(name)))

    try:
        inbox = nc.new_inbox()
        await nc.subscribe(inbox, cb=on_pong)
        deadline = time.monotonic() + timeout
        while len(outcomes) < len(names) and time.monotonic() < deadline:
            await nc.publish("$SRV.PING", b"", reply=inbox)
            await asyncio.sleep(0.02)
        await asyncio.gather(*probes)
        return outcomes
    finally:
        await nc.close()


async def test_every_service_answers_the_moment_discovery_lists_it(tmp_path: Path, node_world: World) -> None:
    names = {f"edgevm-{s}" for s in installed_services()}
    assert names, "no service installed"
    for start in range(3):  # the race was lost in most starts: a few starts show it
        node = start_node_up(tmp_path / "state", tmp_path / f"node{start}.log", node_world)
        try:
            outcomes = await command_each_when_listed(node.url, "e2e", names)
        finally:
            stop_node(node)
        assert outcomes == dict.fromkeys(names, "answered"), f"start {start}: {outcomes}"


# Ctrl-C, and the SIGHUP a terminal sends as it closes: both reach the whole foreground group.
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "terminal-closed"])
async def test_ctrl_c_stops_the_services_before_nats(tmp_path: Path, node_world: World, sig: int) -> None:
    names = {f"edgevm-{s}" for s in installed_services()}
    node = start_node_up(tmp_path / "state", tmp_path / "node.log", node_world)
    try:
        assert await command_each_when_listed(node.url, "e2e", names) == dict.fromkeys(names, "answered")
    finally:
        code = stop_node(node, sig)  # the whole foreground group, as a terminal sends it
    text = node.log.read_text()
    assert code == 0, text
    nats_stops = text.index("services stopped; stopping NATS")
    for name in names:
        stopped = text.find(f"{name} stopped\n")
        assert 0 <= stopped < nats_stops, f"{name} did not stop (drained) before NATS:\n{text}"
    assert "disconnected from NATS" not in text, f"a service lost NATS on the way down:\n{text}"
    assert text.rstrip().endswith("stopped"), text


async def test_a_killed_launcher_leaves_nothing_running_and_the_node_starts_again(tmp_path: Path,
                                                                                 node_world: World) -> None:
    names = {f"edgevm-{s}" for s in installed_services()}
    node = start_node_up(tmp_path / "state", tmp_path / "node.log", node_world)
    children: dict[int, str] = {}
    try:
        assert await command_each_when_listed(node.url, "e2e", names) == dict.fromkeys(names, "answered")
        children = children_of(node.process.pid)
        assert any("nats-server" in command for command in children.values()), children
        os.kill(node.process.pid, signal.SIGKILL)  # the launcher alone, as the OOM killer would
        await asyncio.to_thread(node.process.wait, 10)

        async def all_ended() -> bool:
            return not [command for pid, command in children.items() if alive(pid)]

        await eventually(all_ended, timeout=60, what="the embedded NATS and the services ended with node up")
    finally:
        for pid in children:  # whatever outlived it, so that it does not outlive the test
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        stop_node(node, signal.SIGKILL)
    # Nothing holds the state directory's JetStream store: node up starts on it again.
    again = start_node_up(tmp_path / "state", tmp_path / "again.log", node_world)
    try:
        assert await command_each_when_listed(again.url, "e2e", names) == dict.fromkeys(names, "answered")
    finally:
        stop_node(again)


async def _count_of_vm_list(port: int) -> float:
    def scrape() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            lines = reply.read().decode().splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines
                   if line.startswith("edgevm_commands_total{") and 'endpoint="vm.list"' in line)
    return await asyncio.to_thread(scrape)


async def _vm_lists(nc: NATS, node: str, count: int) -> None:
    for _ in range(count):
        await nc.request(subjects.command(node, "vm.list"), b"{}", timeout=15)


@pytest.mark.skipif("lifecycle" not in installed_services(), reason="the probe is lifecycle's vm.list")
async def test_two_nodes_on_one_host_take_their_metrics_ports_from_the_environment(tmp_path: Path) -> None:
    # Both bases come from EDGEVM_METRICS_BASE_PORT only (no flag); the launcher must hand each its own.
    first = free_port_run(2 * len(SERVICES))
    bases = {"one": first, "two": first + len(SERVICES)}
    nodes: dict[str, NodeUp] = {}
    with node_world_made() as world_one, node_world_made() as world_two:
        try:
            for name, world in (("one", world_one), ("two", world_two)):
                nodes[name] = start_node_up(tmp_path / name, tmp_path / f"{name}.log", world,
                                            {"EDGEVM_METRICS_BASE_PORT": str(bases[name])}, node=name)
            names = {f"edgevm-{s}" for s in installed_services()}
            for name, node in nodes.items():
                assert await command_each_when_listed(node.url, name, names) == dict.fromkeys(names, "answered")
                nc = await nats.connect(node.url)
                try:
                    await _vm_lists(nc, name, 3 if name == "one" else 5)
                finally:
                    await nc.close()
            # Each node's lifecycle counts its own commands on its own port: the ports did not collide.
            assert await _count_of_vm_list(bases["one"]) == 3 + 1  # + the probe's
            assert await _count_of_vm_list(bases["two"]) == 5 + 1
            for name, node in nodes.items():
                assert node.process.poll() is None, node.log.read_text()
                assert f"metrics on http://127.0.0.1:{bases[name]}/metrics" in node.log.read_text()
        finally:
            for node in nodes.values():
                stop_node(node)


async def test_a_second_ctrl_c_kills_a_service_that_does_not_stop(tmp_path: Path, node_world: World) -> None:
    names = {f"edgevm-{s}" for s in installed_services()}
    node = start_node_up(tmp_path / "state", tmp_path / "node.log", node_world)
    try:
        assert await command_each_when_listed(node.url, "e2e", names) == dict.fromkeys(names, "answered")
        stuck = next(pid for pid, cmd in children_of(node.process.pid).items() if "edgevm.gateway" in cmd)
        os.kill(stuck, signal.SIGSTOP)  # it cannot act on SIGTERM: the launcher waits for it
        os.killpg(node.process.pid, signal.SIGINT)

        async def waiting() -> bool:
            return "Ctrl-C again kills them now" in node.log.read_text()

        await eventually(waiting, timeout=20, what="the launcher waits for the services")
        assert node.process.poll() is None, node.log.read_text()  # still waiting (up to STOP_GRACE)
        os.killpg(node.process.pid, signal.SIGINT)
        code = await asyncio.to_thread(node.process.wait, 20)
    finally:
        stop_node(node, signal.SIGKILL)
    text = node.log.read_text()
    assert code == 0 and "services stopped; stopping NATS" in text and text.rstrip().endswith("stopped"), text
    assert not alive(stuck)
