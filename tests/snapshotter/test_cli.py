"""`edgevm snapshot ...` and `edgevm task watch` as a user types them, against lifecycle + snapshotter."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from nats.aio.client import Client as NATS

from edgevm.cli.natsserver import NatsServer
from edgevm.snapshotter.dedupe import BUCKET
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


async def test_snapshot_verbs_send_a_request_id_so_a_retry_makes_no_second_snapshot(
    pair: Pair, nats_server: NatsServer, nc: NATS
) -> None:
    vm = await make_vm(pair, start=True)
    tries = [await edgevm(pair, nats_server, "--json", "snapshot", "create", vm, "once", "--request-id", "try-7f3")
             for _ in range(2)]
    assert [t.returncode for t in tries] == [0, 0], [t.stderr for t in tries]
    first, again = (json.loads(t.stdout) for t in tries)
    assert again["id"] == first["id"] and again["status"] == "succeeded"  # the same task, not a second one
    listed = json.loads((await edgevm(pair, nats_server, "--json", "snapshot", "list", vm)).stdout)["snapshots"]
    assert [s["name"] for s in listed] == ["once"]

    # Without --request-id the CLI makes one up: the snapshotter recorded which task it started.
    plain = await edgevm(pair, nats_server, "--json", "snapshot", "create", vm, "plain", "--no-wait")
    assert plain.returncode == 0, plain.stderr
    requests = await nc.jetstream().key_value(BUCKET)
    prefix = f"{pair.node.config.node}.{vm}.snapshot.create."
    ids = {key.removeprefix(prefix) for key in await requests.keys() if key.startswith(prefix)}
    assert len(ids) == 2 and "try-7f3" in ids, ids
    other = await edgevm(pair, nats_server, "snapshot", "delete", vm, "once", "--request-id", "bad id!")
    assert other.returncode == 1 and "400 [request_id]" in other.stderr, other.stderr
