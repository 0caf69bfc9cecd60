"""A vm.stop whose lifecycle is SIGKILLed at a chosen step ends succeeded after the restart (not `failed`).

The node runs with EDGEVM_TEST_KILL_AT, so lifecycle kills itself the moment the stop reports its step;
`node up` restarts it, and the restarted lifecycle resumes the task (the kill hook does not touch resumed
runs). On libvirt's test driver the restarted process finds no domain (the driver's state is per
connection), which is what an off domain means to a stop; the resume from a domain that still runs is
shown in tests/lifecycle/test_resume.py.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess

import nats
import pytest

from edgevm.shared.client import Client
from tests.e2e.conftest import World, start_node_up
from tests.e2e.test_node_up import ping_names
from tests.helpers import eventually


@pytest.mark.parametrize("step", ["begin", "ACPI shutdown sent"])
async def test_lifecycle_killed_mid_stop_resumes_the_stop(tmp_path, step: str) -> None:  # type: ignore[no-untyped-def]
    tag = secrets.token_hex(3)
    world = World(f"edgevm-t-hk-{tag}", f"edgevm-t-hk{tag}-")
    await asyncio.to_thread(subprocess.run, ["ip", "netns", "add", world.netns], check=True)
    state = tmp_path / "state"
    node = start_node_up(state, tmp_path / "node.log", world, env={"EDGEVM_TEST_KILL_AT": f"vm.stop:{step}"})
    try:
        await eventually(lambda: _lifecycle_answers(node.url), timeout=60, what="lifecycle answers")
        nc = await nats.connect(node.url)
        try:
            client = Client(nc, "e2e", timeout=15)
            (state / "import").mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(subprocess.run, ["qemu-img", "create", "-q", "-f", "qcow2",
                                                     str(state / "import" / "base.qcow2"), "16M"], check=True)
            imported = await client.call("image.import", {"name": "base", "path": "base.qcow2"})
            await eventually(lambda: _ended(client, imported["task"]["id"]), timeout=30, what="import")
            await client.call("vm.create", {"name": "k", "image": "base", "auto_start": True})
            await eventually(lambda: _state(client, "k", "running"), timeout=30, what="VM k runs")
            stop = (await client.call("vm.stop", {"name": "k"}))["task"]
            task = await eventually(lambda: _ended(client, stop["id"]), timeout=90, what="the stop ends")
            assert task["status"] == "succeeded", task
            assert task["started_at"] is not None
            assert "edgevm-lifecycle exited with code -9" in node.log.read_text(errors="replace")
            assert (await client.call("vm.get", {"name": "k"}))["status"]["state"] == "stopped"
        finally:
            await nc.close()
    finally:
        await asyncio.to_thread(_tear_down, node.process, world)


def _tear_down(process: subprocess.Popen[bytes], world: World) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
        if name == world.netns or name.startswith(world.prefix):
            subprocess.run(["ip", "netns", "del", name], check=False)


async def _lifecycle_answers(url: str) -> bool:
    return "edgevm-lifecycle" in await ping_names(url)


async def _ended(client: Client, task_id: str) -> dict | None:
    try:
        task = await client.call("task.get", {"id": task_id})
    except Exception:
        return None  # lifecycle is down for its restart
    return task if task["status"] in ("succeeded", "failed", "cancelled") else None


async def _state(client: Client, vm: str, state: str) -> bool:
    return (await client.call("vm.get", {"name": vm}))["status"]["state"] == state
