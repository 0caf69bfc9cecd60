"""Kill tests whose domain outlives the killed lifecycle, on qemu:///system: the resumed task goes on from the
domain's real state. Run under the heavy lock (`flock /tmp/edgevm-heavy.lock`): each VM is a real QEMU (TCG).

The image is a blank 16 MB disk, so the guest is SeaBIOS finding nothing to boot: a domain that runs and
never answers an ACPI shutdown, which is all a stop, a start and a delete need to see.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg

from edgevm.shared.client import Client
from edgevm.shared.errors import RemoteError
from tests.helpers import eventually
from tests.hostile.test_crash_mid_task import ended, import_base, killing_node
from tests.lifecycle.conftest import state_dir

QEMU = {"EDGEVM_LIBVIRT_URI": "qemu:///system", "EDGEVM_NETWORK": "none"}


def domstate(vm: str) -> str | None:
    """The domain's state as virsh says it (`running`, `shut off`), None when it has no domain."""
    done = subprocess.run(["virsh", "-c", "qemu:///system", "domstate", f"edgevm-{vm}"], capture_output=True,
                          text=True, timeout=30)
    return done.stdout.strip() if done.returncode == 0 else None


def remove_domain(vm: str) -> None:
    for verb in (["destroy"], ["undefine", "--nvram"]):
        subprocess.run(["virsh", "-c", "qemu:///system", *verb, f"edgevm-{vm}"], capture_output=True, timeout=30)


@pytest.mark.parametrize(("kind", "step", "running", "domain_after"), [
    ("vm.stop", "ACPI shutdown sent", True, "shut off"),
    ("vm.start", "starting the domain", False, "running"),
    ("vm.delete", "removing the domain and its files", True, None),
])
async def test_a_task_killed_at_a_step_goes_on_from_the_running_domain(
        tmp_path: Path, kind: str, step: str, running: bool, domain_after: str | None) -> None:
    vm = f"k{secrets.token_hex(3)}"
    state = state_dir()
    try:
        async with killing_node(tmp_path, f"{kind}:{step}", state, QEMU) as (client, log):
            await import_base(client, state)
            await client.call("vm.create", {"name": vm, "image": "base", "stop_timeout": 4, "auto_start": running})
            if running:
                await eventually(lambda: _runs(client, vm), timeout=60, what=f"VM {vm} runs")
            cut = (await client.call(kind, {"name": vm}))["task"]
            task = await eventually(lambda: ended(client, cut["id"]), timeout=120, what="the task ends")
            assert "edgevm-lifecycle exited with code -9" in log.read_text(errors="replace")
            assert task["status"] == "succeeded", task
            assert await asyncio.to_thread(domstate, vm) == domain_after
            if kind == "vm.stop":
                assert task["result"] == {"forced": True}  # the guest never answered ACPI: destroyed in the end
            if domain_after is None:
                with pytest.raises(RemoteError) as info:
                    await client.call("vm.get", {"name": vm})
                assert info.value.code == "404"
                assert not (state / "lifecycle" / "vms" / vm).exists()
    finally:
        await asyncio.to_thread(remove_domain, vm)


@pytest.mark.parametrize("step", ["begin", "destroying the domain"])
async def test_a_forced_stop_killed_destroys_the_running_domain_at_once(tmp_path: Path, step: str) -> None:
    """The resume knows the stop was forced (its request was kept): no ACPI shutdown, no wait of stop_timeout."""
    vm = f"f{secrets.token_hex(3)}"
    state = state_dir()
    node = killing_node(tmp_path, f"vm.stop:{step}", state, QEMU)
    try:
        async with node as (client, log):
            await import_base(client, state)
            await client.call("vm.create", {"name": vm, "image": "base", "stop_timeout": 3600, "auto_start": True})
            await eventually(lambda: _runs(client, vm), timeout=60, what=f"VM {vm} runs")
            events: list[dict[str, Any]] = []

            async def seen(msg: Msg) -> None:
                events.append(json.loads(msg.data)["task"])

            await node.nc.subscribe("edgevm.evt.e2e.task.>", cb=seen)
            cut = (await client.call("vm.stop", {"name": vm, "force": True}))["task"]
            task = await eventually(lambda: ended(client, cut["id"]), timeout=120, what="the task ends")
            assert "edgevm-lifecycle exited with code -9" in log.read_text(errors="replace")
            assert task["status"] == "succeeded" and task["result"] == {"forced": True}, task
            assert await asyncio.to_thread(domstate, vm) == "shut off"
            messages = [t["message"] for t in events if t["id"] == cut["id"]]
            assert "resumed after a restart of the lifecycle" in messages
            assert "ACPI shutdown sent" not in messages, messages
    finally:
        await asyncio.to_thread(remove_domain, vm)


async def _runs(client: Client, vm: str) -> bool:
    return bool((await client.call("vm.get", {"name": vm}))["status"]["state"] == "running")
