"""`edgevm node up` started as a user would: services answer, a killed one comes back, SIGTERM leaves nothing."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from edgevm.cli.natsserver import free_port
from edgevm.cli.supervisor import installed_services
from edgevm.shared.client import Client
from tests.e2e.conftest import World, start_node_up
from tests.helpers import ServiceProcess, eventually


def children_of(pid: int) -> dict[int, str]:
    """Return the live child processes of `pid` with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid and stat.rsplit(")", 1)[1].split()[0] != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def node_up(tmp_path: Path, node_world: World) -> Iterator[tuple[subprocess.Popen[bytes], int, int, Path]]:
    node = start_node_up(tmp_path / "state", tmp_path / "node.log", node_world)
    try:
        yield node.process, node.nats_port, node.metrics_base, node.log
    finally:
        if node.process.poll() is None:
            node.process.kill()
            node.process.wait()


async def ping_names(url: str) -> set[str]:
    """Return the names of the micro services answering $SRV.PING."""
    nc = await nats.connect(url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("$SRV.PING", b"", reply=inbox)
        names = set()
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=max(0.01, deadline - time.monotonic()))
            except (TimeoutError, nats.errors.TimeoutError):
                break
            names.add(json.loads(msg.data)["name"])
        return names
    finally:
        await nc.close()


async def test_node_up_runs_restarts_and_stops_cleanly(node_up: tuple, node_world: World,
                                                       tmp_path: Path) -> None:
    process, nats_port, metrics_base, log = node_up
    state = tmp_path / "state"
    url = f"nats://127.0.0.1:{nats_port}"
    expected = {f"edgevm-{s}" for s in installed_services()}
    assert expected, "no service installed"
    await eventually(lambda: _has(url, expected), timeout=30, what=f"$SRV.PING lists {expected}")
    text = log.read_text()
    assert f"NATS on {url}" in text and "/metrics" in text
    assert port_open(metrics_base + 4), "the gateway's metrics endpoint listens while the node runs"

    # The services work together over NATS: a VRF is a namespace in the node's world, a VM gets an address.
    nc = await nats.connect(url)
    try:
        client = Client(nc, "e2e", timeout=15)
        prefix = node_world.prefix
        await client.call("net.vrf.create", {"name": "blue", "subnet": "10.44.0.0/24"})
        namespaces = await asyncio.to_thread(subprocess.run, ["ip", "netns", "list"], capture_output=True, text=True)
        assert f"{prefix}blue" in namespaces.stdout
        (state / "import").mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(subprocess.run, ["qemu-img", "create", "-q", "-f", "qcow2",
                                                 str(state / "import" / "base.qcow2"), "16M"], check=True)
        imported = await client.call("image.import", {"name": "base", "path": "base.qcow2"})
        await eventually(lambda: _task_ended(client, imported["task"]["id"]), timeout=30, what="import ends")
        vm = await client.call("vm.create", {"name": "web", "image": "base", "network": {"vrf": "blue"}})
        assert ipaddress.IPv4Address(vm["status"]["ip_addresses"][0]) in ipaddress.IPv4Network("10.44.0.0/24")
        await eventually(lambda: _no_flows(client, "web"), timeout=10, what="flowwatch knows the VM")
    finally:
        await nc.close()

    # SIGKILL one service child: node up restarts it and it answers again.
    children = children_of(process.pid)
    victim = next(pid for pid, cmd in children.items() if "edgevm.gateway" in cmd)
    os.kill(victim, signal.SIGKILL)
    await eventually(lambda: _restarted(process.pid, victim), timeout=20, what="the gateway restarted")
    await eventually(lambda: _has(url, {"edgevm-gateway"}), timeout=20, what="the restarted gateway answers")
    assert "edgevm-gateway exited with code -9" in log.read_text()

    # SIGTERM: everything ends, no port is left listening.
    everything = set(children_of(process.pid))
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 30) == 0
    assert not [pid for pid in everything if alive(pid)]
    gateway_metrics = metrics_base + 4
    assert not port_open(nats_port) and not port_open(gateway_metrics)
    assert "stopped" in log.read_text()


async def _no_flows(client: Client, vm: str) -> bool:
    return (await client.call("flow.list", {"vm": vm}))["flows"] == []


async def _task_ended(client: Client, task_id: str) -> bool:
    task = await client.call("task.get", {"id": task_id})
    assert task["status"] != "failed", task["error"]
    return task["status"] == "succeeded"


async def _has(url: str, names: set[str]) -> bool:
    return names <= await ping_names(url)


async def _restarted(parent: int, old: int) -> bool:
    return any("edgevm.gateway" in cmd and pid != old for pid, cmd in children_of(parent).items())


def test_a_service_that_never_reached_nats_stops_on_sigterm(tmp_path: Path) -> None:
    # Nothing listens on this port: the service keeps trying to connect until told to stop.
    service = ServiceProcess("gateway", {"EDGEVM_NATS_URL": f"nats://127.0.0.1:{free_port()}",
                                         "EDGEVM_STATE_DIR": str(tmp_path)}, tmp_path / "gw.log").start()
    time.sleep(3)
    assert service.process is not None and service.process.poll() is None, service.log()
    began = time.monotonic()
    assert service.stop(signal.SIGTERM, timeout=10) == 0, service.log()
    assert time.monotonic() - began < 5, "SIGTERM ended it at once, not after a connect attempt ran out"
