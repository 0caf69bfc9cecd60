"""A crash mid-command leaves nothing half-made: lifecycle killed (SIGKILL) while vm.create requests stream in.

Afterwards, once `node up` has restarted it, every VM asked for either exists, or left nothing behind: no
directory in the state dir, no network (address, port mapping) held by netplumb.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

from edgevm.shared.errors import RemoteError
from tests.e2e.test_node_up import ping_names
from tests.helpers import eventually
from tests.hostile.conftest import HostileNode
from tests.hostile.test_hostile_requests import subject_of

COUNT = 120


def child_pid(parent: int, module: str) -> int:
    """The pid of `parent`'s child process running `python -m <module>`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and module.encode() in argv:
            return int(entry.name)
    raise LookupError(f"no child {module} of {parent}")


async def held_by_netplumb(hostile_node: HostileNode, vm: str) -> bool:
    try:
        await hostile_node.client.call("net.status", {"vm": vm})
    except RemoteError as exc:
        assert exc.code == "404", exc
        return False
    return True


async def test_lifecycle_killed_mid_create_leaves_no_half_made_vm(hostile_node: HostileNode) -> None:
    lifecycle = child_pid(hostile_node.node.process.pid, "edgevm.lifecycle")
    sent = []
    for i in range(COUNT):
        body = {"name": f"c{i}", "image": "base", "network": {
            "vrf": "blue", "port_mappings": [{"host_interface": "lo", "host_port": 20000 + i, "vm_port": 80}]}}
        sent.append(asyncio.ensure_future(hostile_node.nc.request(
            subject_of("vm.create"), json.dumps(body).encode(), timeout=15)))
        await asyncio.sleep(0.01)
        if i == COUNT // 2:
            os.kill(lifecycle, signal.SIGKILL)
    await asyncio.gather(*sent, return_exceptions=True)
    await eventually(lambda: _lifecycle_answers(hostile_node), timeout=60, what="lifecycle is back")
    # The restarted lifecycle sweeps what the cut creates left once netplumb answers, in the background.
    await eventually(lambda: _nothing_half_made(hostile_node), timeout=60, what="no half-made VM is left")


async def _nothing_half_made(hostile_node: HostileNode) -> bool:
    vms = {vm["spec"]["name"] for vm in (await hostile_node.client.call("vm.list"))["vms"]}
    vm_dirs = hostile_node.state / "lifecycle" / "vms"
    half_made = []
    for i in range(COUNT):
        name = f"c{i}"
        if name in vms:
            continue
        if (vm_dirs / name).exists() or await held_by_netplumb(hostile_node, name):
            half_made.append(name)
    assert len(vms) > 1  # the creates before the kill made their VMs
    return half_made == []


async def _lifecycle_answers(hostile_node: HostileNode) -> bool:
    return "edgevm-lifecycle" in await ping_names(hostile_node.node.url)
