"""`edgevm snapshot ...` and `edgevm task watch` as a user types them, against lifecycle + snapshotter."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from edgevm.cli.natsserver import NatsServer
from tests.snapshotter.conftest import Pair
from tests.snapshotter.test_snapshot_tasks import make_vm


async def edgevm(pair: Pair, server: NatsServer, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(Path(sys.executable).parent / "edgevm"), "--nats", server.url, "--node", pair.node.config.node, *args]
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=60)


async def test_snapshot_verbs_follow_their_tasks_and_list_the_tree(pair: Pair, nats_server: NatsServer) -> None:
    vm = await make_vm(pair, start=True)
    for name in ("base", "after"):
        made = await edgevm(pair, nats_server, "snapshot", "create", vm, name, "--description", f"the {name}")
        assert made.returncode == 0, made.stderr
        assert "snapshot.create" in made.stdout and "succeeded" in made.stdout
        assert "100% succeeded" in made.stderr  # followed live
    tree = await edgevm(pair, nats_server, "snapshot", "list", vm)
    lines = tree.stdout.splitlines()
    assert lines[0].split()[:2] == ["NAME", "(*"]
    assert lines[1].startswith("base ") and lines[2].startswith("  after *"), tree.stdout  # child indented, current

    queued = await edgevm(pair, nats_server, "--json", "snapshot", "restore", vm, "base", "--no-wait")
    assert queued.returncode == 0, queued.stderr
    task = json.loads(queued.stdout)
    assert task["kind"] == "snapshot.restore" and task["status"] in ("queued", "running", "succeeded")
    watched = await edgevm(pair, nats_server, "task", "watch", task["id"])
    assert watched.returncode == 0 and f"snapshot.restore {task['id']}: succeeded" in watched.stdout, watched.stderr
    listed = json.loads((await edgevm(pair, nats_server, "--json", "snapshot", "list", vm)).stdout)["snapshots"]
    assert {s["name"]: s["current"] for s in listed} == {"base": True, "after": False}

    deleted = await edgevm(pair, nats_server, "snapshot", "delete", vm, "after")
    assert deleted.returncode == 0 and "succeeded" in deleted.stdout, deleted.stderr
    missing = await edgevm(pair, nats_server, "snapshot", "restore", vm, "after")
    assert missing.returncode == 1 and "404" in missing.stderr
