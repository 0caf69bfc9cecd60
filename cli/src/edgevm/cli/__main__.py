"""The `edgevm` command: `node up`, and a thin client of the protocol for images, VMs and tasks."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

import msgspec
import nats
import yaml

from edgevm.cli.output import fail, print_json, print_table
from edgevm.cli.supervisor import NodeOptions, Supervisor
from edgevm.shared.client import Client
from edgevm.shared.config import DEFAULT_METRICS_BASE, default_node_id
from edgevm.shared.errors import EdgevmError
from edgevm.shared.objects import Task
from edgevm.shared.units import format_size


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every verb."""
    parser = argparse.ArgumentParser(prog="edgevm", description="Run and drive an edgevm node over NATS.")
    parser.add_argument("--nats", default=os.environ.get("EDGEVM_NATS_URL", "nats://127.0.0.1:4222"),
                        help="NATS URL (default: $EDGEVM_NATS_URL or nats://127.0.0.1:4222)")
    parser.add_argument("--node", default=os.environ.get("EDGEVM_NODE") or default_node_id(),
                        help="node id (default: $EDGEVM_NODE or this host's name)")
    parser.add_argument("--json", action="store_true", help="print replies as JSON")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a reply")
    areas = parser.add_subparsers(dest="area", required=True)

    node = areas.add_parser("node", help="run this host as an edgevm node").add_subparsers(dest="verb", required=True)
    up = node.add_parser("up", help="start NATS (embedded) and every service; Ctrl-C stops all")
    up.add_argument("--nats", dest="external_nats", default=None, help="use this NATS server instead of embedding one")
    up.add_argument("--state-dir", type=Path, default=Path(os.environ.get("EDGEVM_STATE_DIR", "/var/lib/edgevm")))
    up.add_argument("--listen", default="127.0.0.1", help="address of the embedded NATS (default loopback)")
    up.add_argument("--nats-port", type=int, default=4222)
    up.add_argument("--metrics-base-port", type=int, default=DEFAULT_METRICS_BASE)
    up.add_argument("--libvirt-uri", default=os.environ.get("EDGEVM_LIBVIRT_URI"))

    image = areas.add_parser("image", help="images in the node's store").add_subparsers(dest="verb", required=True)
    imp = image.add_parser("import", help="import a file on the node as an image")
    imp.add_argument("name")
    imp.add_argument("path")
    imp.add_argument("--format", choices=["qcow2", "raw", "iso"])
    imp.add_argument("--guest-os", default="linux")
    imp.add_argument("--no-wait", action="store_true")
    image.add_parser("list")
    for verb in ("get", "delete"):
        image.add_parser(verb).add_argument("name")

    vm = areas.add_parser("vm", help="virtual machines").add_subparsers(dest="verb", required=True)
    create = vm.add_parser("create", help="create a VM from a YAML or JSON spec file")
    create.add_argument("-f", "--file", required=True, help="spec file ('-' for stdin)")
    vm.add_parser("list")
    vm.add_parser("get").add_argument("name")
    for verb in ("start", "restart", "delete"):
        p = vm.add_parser(verb)
        p.add_argument("name")
        p.add_argument("--no-wait", action="store_true")
    stop = vm.add_parser("stop")
    stop.add_argument("name")
    stop.add_argument("--force", action="store_true", help="kill at once instead of an ACPI shutdown")
    stop.add_argument("--no-wait", action="store_true")
    update = vm.add_parser("update", help="change fields of a VM (YAML/JSON file of the fields)")
    update.add_argument("name")
    update.add_argument("-f", "--file", required=True)
    update.add_argument("--revision", type=int, help="the revision you saw (default: the current one)")

    task = areas.add_parser("task", help="tasks (Recent Tasks)").add_subparsers(dest="verb", required=True)
    tl = task.add_parser("list")
    tl.add_argument("--vm")
    tl.add_argument("--limit", type=int, default=50)
    for verb in ("get", "cancel", "watch"):
        task.add_parser(verb).add_argument("id")
    return parser


def load_document(path: str) -> Any:
    """Read a YAML or JSON document from a file or stdin."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    return yaml.safe_load(text)


async def follow_task(client: Client, task: Task, quiet: bool = False) -> Task:
    """Poll a task until it ends, showing its progress; return it."""
    last = ""
    while not task.finished:
        line = f"{task.kind} {task.id}: {task.status} {task.progress or 0}% {task.message}"
        if line != last and not quiet:
            print(line, file=sys.stderr, flush=True)
            last = line
        await asyncio.sleep(0.3)
        task = await client.call("task.get", {"id": task.id}, Task)
    return task


async def run_command(args: argparse.Namespace) -> int:
    """Connect, send the command `args` stand for, print the reply; return the exit code."""
    nc = await nats.connect(args.nats, connect_timeout=3, max_reconnect_attempts=1)
    client = Client(nc, args.node, timeout=args.timeout)
    try:
        return await dispatch(client, args)
    finally:
        await nc.drain()


async def finish(client: Client, args: argparse.Namespace, reply: dict[str, Any]) -> int:
    """Print a `{task}` reply, following the task unless --no-wait."""
    task = msgspec.convert(reply["task"], Task)
    if not getattr(args, "no_wait", False):
        task = await follow_task(client, task, quiet=args.json)
    if args.json:
        print_json(task)
    else:
        print(f"{task.kind} {task.id}: {task.status}{' - ' + task.error if task.error else ''}")
    return 0 if task.status in ("succeeded", "queued", "running") else 1


async def dispatch(client: Client, args: argparse.Namespace) -> int:
    """Run one verb."""
    area, verb = args.area, args.verb
    if area == "image":
        if verb == "import":
            # The path is the node's: absolute, or relative to its import directory (<state>/import).
            body = {"name": args.name, "path": args.path, "guest_os": args.guest_os}
            if args.format:
                body["format"] = args.format
            return await finish(client, args, await client.call("image.import", body))
        if verb == "list":
            reply = await client.call("image.list")
            if args.json:
                print_json(reply)
            else:
                print_table(["name", "format", "size", "guest os", "created"],
                            [[i["name"], i["format"], format_size(i["size_bytes"]), i["guest_os"], i["created_at"]]
                             for i in reply["images"]])
            return 0
        reply = await client.call(f"image.{verb}", {"name": args.name})
        print_json(reply)
        return 0
    if area == "vm":
        if verb == "create":
            print_vm(await client.call("vm.create", load_document(args.file)), args.json)
            return 0
        if verb == "list":
            reply = await client.call("vm.list")
            if args.json:
                print_json(reply)
            else:
                print_table(["name", "state", "cpu", "memory", "image", "firmware", "revision"],
                            [[v["spec"]["name"], v["status"]["state"], v["spec"]["cpu"],
                              format_size(v["spec"]["memory"]), v["spec"]["image"], v["spec"]["firmware"],
                              v["status"]["revision"]] for v in reply["vms"]])
            return 0
        if verb == "get":
            print_vm(await client.call("vm.get", {"name": args.name}), args.json)
            return 0
        if verb == "update":
            changes = load_document(args.file) or {}
            revision = args.revision
            if revision is None:
                revision = (await client.call("vm.get", {"name": args.name}))["status"]["revision"]
            print_vm(await client.call("vm.update", {**changes, "name": args.name, "revision": revision}), args.json)
            return 0
        body: dict[str, Any] = {"name": args.name}
        if verb == "stop" and args.force:
            body["force"] = True
        return await finish(client, args, await client.call(f"vm.{verb}", body))
    if area == "task":
        if verb == "list":
            body = {"limit": args.limit, **({"vm": args.vm} if args.vm else {})}
            reply = await client.call("task.list", body)
            if args.json:
                print_json(reply)
            else:
                print_table(["id", "kind", "vm", "status", "progress", "created", "message"],
                            [[t["id"], t["kind"], t["vm"], t["status"], t["progress"], t["created_at"], t["message"]]
                             for t in reply["tasks"]])
            return 0
        if verb == "watch":
            task = await client.call("task.get", {"id": args.id}, Task)
            return await finish(client, args, {"task": msgspec.to_builtins(task)})
        print_json(await client.call(f"task.{verb}", {"id": args.id}))
        return 0
    raise AssertionError(f"unknown verb {area} {verb}")


def print_vm(vm: dict[str, Any], as_json: bool) -> None:
    """Print one VM."""
    if as_json:
        print_json(vm)
        return
    spec, status = vm["spec"], vm["status"]
    print_table(["field", "value"], [
        ["name", spec["name"]], ["state", status["state"]], ["revision", status["revision"]],
        ["image", spec["image"]], ["firmware", spec["firmware"]], ["device bus", spec["device_bus"]],
        ["cpu", spec["cpu"]], ["memory", format_size(spec["memory"])], ["vrf", spec["network"]["vrf"]],
        ["ip addresses", ", ".join(status["ip_addresses"])], ["last error", status["last_error"]],
    ])


def main(argv: list[str] | None = None) -> None:
    """Entry point of `edgevm`."""
    args = build_parser().parse_args(argv)
    if args.area == "node":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
        options = NodeOptions(
            node=args.node,
            state_dir=args.state_dir,
            nats_url=args.external_nats,
            nats_host=args.listen,
            nats_port=args.nats_port,
            metrics_base_port=args.metrics_base_port,
            libvirt_uri=args.libvirt_uri,
        )
        asyncio.run(Supervisor(options).run())
        return
    try:
        raise SystemExit(asyncio.run(run_command(args)))
    except EdgevmError as exc:
        field = f" [{exc.field}]" if exc.field else ""
        fail(f"{exc.code}{field}: {exc.message}")
    except (OSError, nats.errors.NoServersError) as exc:
        fail(f"cannot reach NATS at {args.nats}: {exc}")


if __name__ == "__main__":
    main()
