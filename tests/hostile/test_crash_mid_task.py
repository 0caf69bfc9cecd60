"""A lifecycle task whose process is SIGKILLed at a chosen step is resumed after the restart and ends as
asked (succeeded), or fails with the real reason: at each step of each kind.

The node runs with EDGEVM_TEST_KILL_AT, so lifecycle kills itself the moment a task of that kind reports the
step (`begin`: as its work starts); `node up` restarts it, and the restarted lifecycle resumes the task (the
hook never touches resumed runs). On libvirt's test driver the restarted process starts with no domain (the
driver's state is per connection): it defines them again from the records before it resumes, so a stop finds
its domain off and a start starts it. The resume from a domain that still runs is
tests/lifecycle/test_resume.py.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from pathlib import Path
from typing import Any

import nats
import pytest

from edgevm.shared.client import Client
from edgevm.shared.errors import RemoteError
from tests.e2e.conftest import World, start_node_up
from tests.e2e.test_node_up import ping_names
from tests.helpers import eventually

DELETE_STOP = "stopping the VM (ACPI, then killed after its stop_timeout)"
CASES = [  # kind, step, its request beyond the VM's name, the VM's running before, its state after
    ("vm.start", "begin", {}, False, "running"),
    ("vm.start", "starting the domain", {}, False, "running"),
    ("vm.stop", "begin", {}, True, "stopped"),
    ("vm.stop", "ACPI shutdown sent", {}, True, "stopped"),
    ("vm.stop", "destroying the domain", {"force": True}, True, "stopped"),
    ("vm.restart", "begin", {}, True, "running"),
    ("vm.restart", "ACPI shutdown sent", {}, True, "running"),
    ("vm.restart", "starting the domain", {}, True, "running"),
    ("vm.delete", "begin", {}, True, None),
    ("vm.delete", DELETE_STOP, {}, True, None),
    ("vm.delete", "releasing its network", {}, True, None),
    ("vm.delete", "removing the domain and its files", {}, True, None),
]


@pytest.mark.parametrize(("kind", "step", "body", "running", "after"), CASES)
async def test_a_vm_task_killed_at_a_step_is_resumed(tmp_path: Path, kind: str, step: str, body: dict[str, Any],
                                                     running: bool, after: str | None) -> None:
    async with killing_node(tmp_path, f"{kind}:{step}") as (client, log):
        await import_base(client, tmp_path / "state")
        await client.call("net.vrf.create", {"name": "blue", "subnet": "10.45.0.0/24"})
        await client.call("vm.create", {"name": "k", "image": "base", "auto_start": running,
                                        "network": {"vrf": "blue"}})
        await eventually(lambda: _state(client, "k", "running" if running else "defined"), timeout=30,
                         what="VM k is ready")
        cut = (await client.call(kind, {"name": "k", **body}))["task"]
        task = await eventually(lambda: _ended(client, cut["id"]), timeout=90, what="the task ends")
        assert "edgevm-lifecycle exited with code -9" in log.read_text(errors="replace")
        assert task["status"] == "succeeded", task
        assert task["started_at"] is not None and task["id"] == cut["id"]
        if after is None:
            with pytest.raises(RemoteError) as info:
                await client.call("vm.get", {"name": "k"})
            assert info.value.code == "404"
            assert not (tmp_path / "state" / "lifecycle" / "vms" / "k").exists()
            with pytest.raises(RemoteError) as info:
                await client.call("net.status", {"vm": "k"})  # its address is given back
            assert info.value.code == "404"
        else:
            assert (await client.call("vm.get", {"name": "k"}))["status"]["state"] == after


@pytest.mark.parametrize("step", ["begin", "recording the image"])
async def test_an_image_import_killed_fails_saying_to_import_again(tmp_path: Path, step: str) -> None:
    async with killing_node(tmp_path, f"image.import:{step}") as (client, log):
        (tmp_path / "state" / "import").mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(subprocess.run, ["qemu-img", "create", "-q", "-f", "qcow2",
                                                 str(tmp_path / "state" / "import" / "base.qcow2"), "16M"], check=True)
        cut = (await client.call("image.import", {"name": "base", "path": "base.qcow2"}))["task"]
        task = await eventually(lambda: _ended(client, cut["id"]), timeout=90, what="the import ends")
        assert "edgevm-lifecycle exited with code -9" in log.read_text(errors="replace")
        assert task["status"] == "failed" and "import the image again" in task["error"], task
        with pytest.raises(RemoteError) as info:
            await client.call("image.get", {"name": "base"})
        assert info.value.code == "404"
        # Neither a partial copy nor a whole one without its record is left in the store.
        assert list((tmp_path / "state" / "lifecycle" / "images").glob("*base*")) == []


class killing_node:
    """`edgevm node up` (test driver, its network in a namespace of its own) whose lifecycle kills itself at
    `kill_at`; yields a client and the launcher's log."""

    def __init__(self, root: Path, kill_at: str, state: Path | None = None, env: dict[str, str] | None = None) -> None:
        tag = secrets.token_hex(3)
        self.world = World(f"edgevm-t-hk-{tag}", f"edgevm-t-hk{tag}-")
        self.root = root
        self.state = state or root / "state"
        self.kill_at = kill_at
        self.env = env or {}

    async def __aenter__(self) -> tuple[Client, Path]:
        await asyncio.to_thread(subprocess.run, ["ip", "netns", "add", self.world.netns], check=True)
        self.node = start_node_up(self.state, self.root / "node.log", self.world,
                                  env={"EDGEVM_TEST_KILL_AT": self.kill_at, **self.env})
        await eventually(lambda: _answers(self.node.url), timeout=120, what="the services answer")
        self.nc = await nats.connect(self.node.url)
        return Client(self.nc, "e2e", timeout=15), self.node.log

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()
        await asyncio.to_thread(_tear_down, self.node.process, self.world)


async def import_base(client: Client, state: Path) -> None:
    (state / "import").mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(subprocess.run, ["qemu-img", "create", "-q", "-f", "qcow2",
                                             str(state / "import" / "base.qcow2"), "16M"], check=True)
    imported = await client.call("image.import", {"name": "base", "path": "base.qcow2"})
    done = await eventually(lambda: _ended(client, imported["task"]["id"]), timeout=30, what="import")
    assert done["status"] == "succeeded", done


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


async def ended(client: Client, task_id: str) -> dict[str, Any] | None:
    """The task once it has ended; None before, or while lifecycle is down for its restart."""
    return await _ended(client, task_id)


async def _answers(url: str) -> bool:
    return {"edgevm-lifecycle", "edgevm-netplumb"} <= await ping_names(url)


async def _ended(client: Client, task_id: str) -> dict[str, Any] | None:
    try:
        task = await client.call("task.get", {"id": task_id})
    except Exception:
        return None  # lifecycle is down for its restart
    return task if task["status"] in ("succeeded", "failed", "cancelled") else None


async def _state(client: Client, vm: str, state: str) -> bool:
    return bool((await client.call("vm.get", {"name": vm}))["status"]["state"] == state)
