"""The `edgevm` CLI as a user types it, against a lifecycle node on libvirt's test driver."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from edgevm.cli.natsserver import NatsServer
from tests.lifecycle.conftest import Node


async def edgevm(node: Node, server: NatsServer, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [str(Path(sys.executable).parent / "edgevm"), "--nats", server.url, "--node", node.config.node, *args]
    return await asyncio.to_thread(subprocess.run, cmd, input=stdin, capture_output=True, text=True, timeout=60)


async def test_cli_image_vm_and_task_verbs(node: Node, nats_server: NatsServer, tmp_path: Path) -> None:
    node.make_image_file("base.qcow2")
    out = await edgevm(node, nats_server, "image", "import", "base", "base.qcow2")
    assert out.returncode == 0, out.stderr
    assert "image.import" in out.stdout and "succeeded" in out.stdout
    images = await edgevm(node, nats_server, "image", "list")
    assert images.stdout.splitlines()[0].split()[:2] == ["NAME", "FORMAT"] and "base" in images.stdout

    spec = tmp_path / "web.yaml"
    spec.write_text("name: web\nimage: base\nmemory: 256MB\ncpu: 1\nhostname: web1\n")
    created = await edgevm(node, nats_server, "vm", "create", "-f", str(spec))
    assert created.returncode == 0, created.stderr
    assert "defined" in created.stdout and "256MiB" in created.stdout
    started = await edgevm(node, nats_server, "vm", "start", "web")
    assert started.returncode == 0 and "succeeded" in started.stdout, started.stderr
    got = json.loads((await edgevm(node, nats_server, "--json", "vm", "get", "web")).stdout)
    assert got["status"]["state"] == "running" and got["spec"]["hostname"] == "web1"
    listed = await edgevm(node, nats_server, "vm", "list")
    assert "web" in listed.stdout and "running" in listed.stdout
    updated = await edgevm(node, nats_server, "vm", "update", "web", "-f", "-", stdin="description: hi\n")
    assert updated.returncode == 0, updated.stderr
    stopped = await edgevm(node, nats_server, "vm", "stop", "web", "--force")
    assert stopped.returncode == 0 and "succeeded" in stopped.stdout
    tasks = await edgevm(node, nats_server, "task", "list", "--vm", "web")
    assert [line.split()[1] for line in tasks.stdout.splitlines()[1:]] == ["vm.stop", "vm.start"]
    assert "[####################] 100% succeeded" in stopped.stderr  # the live progress line
    stop_id = tasks.stdout.splitlines()[1].split()[0]
    watched = await edgevm(node, nats_server, "task", "watch", stop_id)
    assert watched.returncode == 0 and f"vm.stop {stop_id}: succeeded" in watched.stdout, watched.stderr

    bad = await edgevm(node, nats_server, "vm", "create", "-f", "-", stdin="name: x\nimage: base\ncpu: 0\n")
    assert bad.returncode == 1 and "400 [cpu]" in bad.stderr
    missing = await edgevm(node, nats_server, "vm", "get", "ghost")
    assert missing.returncode == 1 and "404 [name]" in missing.stderr
    deleted = await edgevm(node, nats_server, "vm", "delete", "web")
    assert deleted.returncode == 0 and "succeeded" in deleted.stdout
