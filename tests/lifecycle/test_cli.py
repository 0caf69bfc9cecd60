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
    image = await edgevm(node, nats_server, "image", "get", "base")  # a table of fields, JSON only with --json
    assert [line.split()[:2] for line in image.stdout.splitlines()[:3]] == [["FIELD", "VALUE"], ["name", "base"],
                                                                            ["format", "qcow2"]], image.stdout

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
    got_task = await edgevm(node, nats_server, "task", "get", stop_id)
    assert ["status", "succeeded"] in [line.split() for line in got_task.stdout.splitlines()], got_task.stdout
    watched = await edgevm(node, nats_server, "task", "watch", stop_id)
    assert watched.returncode == 0 and f"vm.stop {stop_id}: succeeded" in watched.stdout, watched.stderr

    bad = await edgevm(node, nats_server, "vm", "create", "-f", "-", stdin="name: x\nimage: base\ncpu: 0\n")
    assert bad.returncode == 1 and "400 [cpu]" in bad.stderr
    missing = await edgevm(node, nats_server, "vm", "get", "ghost")
    assert missing.returncode == 1 and "404 [name]" in missing.stderr
    deleted = await edgevm(node, nats_server, "vm", "delete", "web")
    assert deleted.returncode == 0 and "succeeded" in deleted.stdout


async def test_cli_names_a_spec_file_it_cannot_use(node: Node, nats_server: NatsServer, tmp_path: Path) -> None:
    missing = await edgevm(node, nats_server, "vm", "create", "-f", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1, missing.stderr
    assert missing.stderr.startswith(f"edgevm: {tmp_path / 'nope.yaml'}: cannot be read: No such file")
    assert "NATS" not in missing.stderr

    broken = tmp_path / "broken.yaml"
    broken.write_text("name: web\nimage: [base\n")
    bad_yaml = await edgevm(node, nats_server, "vm", "create", "-f", str(broken))
    assert bad_yaml.returncode == 1 and "Traceback" not in bad_yaml.stderr, bad_yaml.stderr
    assert bad_yaml.stderr.startswith(f"edgevm: {broken}: is not valid YAML or JSON: ")
    assert "at line 3" in bad_yaml.stderr

    listed = await edgevm(node, nats_server, "vm", "update", "web", "-f", "-", stdin="- name: web\n")
    assert listed.returncode == 1 and "Traceback" not in listed.stderr, listed.stderr
    assert listed.stderr.startswith("edgevm: stdin: must be a mapping of fields") and "not a list" in listed.stderr
    scalar = await edgevm(node, nats_server, "vm", "create", "-f", "-", stdin="just words\n")
    assert scalar.returncode == 1 and "not a str" in scalar.stderr, scalar.stderr
