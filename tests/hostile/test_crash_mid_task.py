"""A lifecycle task whose process is SIGKILLed at a chosen step is resumed after the restart and ends as
asked (succeeded), or fails with the real reason: at each step of each kind. An import is copied again from
its source (its request was kept before it was accepted), a forced stop destroys at once.

The node runs with EDGEVM_TEST_KILL_AT, so lifecycle kills itself the moment a task of that kind reports the
step (`begin`: as its work starts); `node up` restarts it, and the restarted lifecycle resumes the task (the
hook never touches resumed runs). On libvirt's test driver the restarted process starts with no domain (the
driver's state is per connection): it defines them again from the records before it resumes, so a stop finds
its domain off and a start starts it. The resume from a domain that still runs is
tests/lifecycle/test_resume.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from edgevm.cli.natsserver import NatsServer
from edgevm.shared.client import Client
from edgevm.shared.commands import TaskReply
from edgevm.shared.errors import RemoteError
from tests.e2e.conftest import World, start_node_up
from tests.e2e.test_node_up import ping_names
from tests.helpers import eventually
from tests.lifecycle.conftest import private_test_uri, start_node, state_dir
from tests.lifecycle.test_lifecycle_breadth import wait_task

DELETE_STOP = "stopping the VM (ACPI, then killed after its stop_timeout)"
CASES = [  # kind, step, its request beyond the VM's name, the VM's running before, its state after
    ("vm.start", "begin", {}, False, "running"),
    ("vm.start", "starting the domain", {}, False, "running"),
    ("vm.stop", "begin", {}, True, "stopped"),
    ("vm.stop", "ACPI shutdown sent", {}, True, "stopped"),
    ("vm.stop", "begin", {"force": True}, True, "stopped"),
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
        if body.get("force"):
            assert task["result"] == {"forced": True}  # destroyed, not shut down by ACPI
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


@pytest.mark.parametrize(("step", "source"), [
    ("begin", "base.qcow2"),
    ("copying base.raw", "base.raw"),  # a big file: the copy reports its progress, the kill leaves a partial
    ("recording the image", "base.qcow2"),  # the whole copy is in place, its record not yet written
])
async def test_an_image_import_killed_is_copied_again_and_succeeds(tmp_path: Path, step: str, source: str) -> None:
    async with killing_node(tmp_path, f"image.import:{step}") as (client, log):
        await make_source(tmp_path / "state" / "import" / source)
        cut = (await client.call("image.import", {"name": "base", "path": source}))["task"]
        task = await eventually(lambda: _ended(client, cut["id"]), timeout=90, what="the import ends")
        assert "edgevm-lifecycle exited with code -9" in log.read_text(errors="replace")
        assert task["status"] == "succeeded", task
        assert (task["id"], task["started_at"]) == (cut["id"], cut["started_at"] or task["started_at"])
        image = await client.call("image.get", {"name": "base"})
        assert image["sha256"] == await asyncio.to_thread(sha256_of, tmp_path / "state" / "import" / source)
        assert image == task["result"]
        # One whole copy in the store, no partial one; the image is usable.
        assert sorted(p.name for p in (tmp_path / "state" / "lifecycle" / "images").iterdir()) == [
            f"base.{image['format']}"]
        vm = await client.call("vm.create", {"name": "on-it", "image": "base"})
        assert vm["status"]["state"] == "defined"
        assert list((tmp_path / "state" / "lifecycle" / "requests").iterdir()) == []


async def make_source(path: Path) -> None:
    """A 16 MB qcow2, or for a `.raw` a 3 GiB sparse raw (long enough to read that the copy shows progress)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".raw":
        with path.open("wb") as f:
            f.truncate(3 * 1024**3)
        return
    await asyncio.to_thread(subprocess.run, ["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


async def killed_import(nats_server: NatsServer, nc: NATS, step: str) -> tuple[Path, str, str]:
    """Run edgevm-lifecycle as a process of its own, killed (SIGKILL, by its kill hook) at `step` of an import of
    `base.raw`; return its state directory, its node and the import's task id once the process is gone (no one
    restarts it)."""
    state = state_dir()
    node = f"n{secrets.token_hex(4)}"
    await make_source(state / "import" / "base.raw")
    env = {**os.environ, "EDGEVM_NODE": node, "EDGEVM_NATS_URL": nats_server.url, "EDGEVM_STATE_DIR": str(state),
           "EDGEVM_LIBVIRT_URI": private_test_uri(state), "EDGEVM_NETWORK": "none", "EDGEVM_METRICS_PORT": "0",
           "EDGEVM_TEST_KILL_AT": f"image.import:{step}"}
    process = await asyncio.create_subprocess_exec(str(Path(sys.executable).parent / "edgevm-lifecycle"), env=env,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = Client(nc, node)
        await eventually(lambda: client.call("image.list"), timeout=60, what="the lifecycle answers")
        cut = (await client.call("image.import", {"name": "base", "path": "base.raw"}))["task"]
        assert await asyncio.wait_for(process.wait(), 60) == -signal.SIGKILL
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return state, node, str(cut["id"])


async def test_a_killed_import_whose_source_is_deleted_meanwhile_fails_naming_it(
        nats_server: NatsServer, nc: NATS) -> None:
    state, node, task_id = await killed_import(nats_server, nc, "copying base.raw")
    assert list((state / "lifecycle" / "images").glob(".base.*.part"))  # the kill left a partial copy
    (state / "import" / "base.raw").unlink()  # while the service is down
    again = await start_node(nats_server, nc, state=state, node=node)
    try:
        task = await wait_task(again, {"task": {"id": task_id}}, timeout=60)
        assert task.status == "failed"
        assert "'base.raw' does not exist" in (task.error or ""), task.error
        assert list((state / "lifecycle" / "images").iterdir()) == []  # no partial copy, no whole one
        with pytest.raises(RemoteError) as info:
            await again.client.call("image.get", {"name": "base"})
        assert info.value.code == "404"
    finally:
        await again.shutdown()


async def test_a_killed_import_whose_kept_request_is_torn_fails_and_the_service_starts(
        nats_server: NatsServer, nc: NATS) -> None:
    state, node, task_id = await killed_import(nats_server, nc, "begin")
    kept = state / "lifecycle" / "requests" / f"{task_id}.json"
    kept.write_bytes(kept.read_bytes()[:25])  # torn, as a power loss may leave it
    again = await start_node(nats_server, nc, state=state, node=node)
    try:
        task = await wait_task(again, {"task": {"id": task_id}}, timeout=60)
        assert task.status == "failed"
        assert f"kept in {kept}, cannot be read" in (task.error or ""), task.error
        assert "import the image again" in (task.error or "")
        assert list((state / "lifecycle" / "images").iterdir()) == []
        await again.client.call("vm.list")  # the service serves
        redo = await wait_task(again, await again.client.call("image.import", {"name": "base", "path": "base.raw"},
                                                              TaskReply), timeout=120)
        assert redo.status == "succeeded", redo.error
    finally:
        await again.shutdown()


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
