"""The `edgevm` command: `node up`, and a thin client of the protocol for images, VMs and tasks."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import yaml

from edgevm.cli.output import fail, print_json, print_table
from edgevm.cli.supervisor import NodeOptions, Supervisor
from edgevm.shared import subjects
from edgevm.shared.client import Client
from edgevm.shared.config import DEFAULT_METRICS_BASE, default_node_id
from edgevm.shared.errors import EdgevmError
from edgevm.shared.objects import Task
from edgevm.shared.units import format_size


def env_default(variable: str, fallback: str | None) -> str | None:
    """Return the value of environment variable `variable` when set and not empty, else `fallback`."""
    return os.environ.get(variable) or fallback


def port_number(variable: str) -> Callable[[str], int]:
    """Return a parser of a TCP port given by a flag or (argparse parses a string default too) by `variable`."""
    def parse(text: str) -> int:
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            raise argparse.ArgumentTypeError(f"{text!r} (the flag, or ${variable}) is not a port: 1..65535")
        return int(text)
    return parse


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
    # Every flag defaults to its environment variable, so a node's settings can live in its environment.
    up.add_argument("--nats", dest="external_nats", default=env_default("EDGEVM_EXTERNAL_NATS", None),
                    help="use this NATS server instead of embedding one (default: $EDGEVM_EXTERNAL_NATS)")
    up.add_argument("--state-dir", type=Path, default=env_default("EDGEVM_STATE_DIR", "/var/lib/edgevm"),
                    help="images, VM disks, the embedded NATS store (default: $EDGEVM_STATE_DIR or /var/lib/edgevm)")
    up.add_argument("--listen", default=env_default("EDGEVM_NATS_LISTEN", "127.0.0.1"),
                    help="address of the embedded NATS (default: $EDGEVM_NATS_LISTEN or 127.0.0.1)")
    up.add_argument("--nats-port", type=port_number("EDGEVM_NATS_PORT"),
                    default=env_default("EDGEVM_NATS_PORT", "4222"),
                    help="port of the embedded NATS (default: $EDGEVM_NATS_PORT or 4222)")
    up.add_argument("--metrics-base-port", type=port_number("EDGEVM_METRICS_BASE_PORT"),
                    default=env_default("EDGEVM_METRICS_BASE_PORT", str(DEFAULT_METRICS_BASE)),
                    help=f"lifecycle's metrics port; the others follow (default: $EDGEVM_METRICS_BASE_PORT or "
                         f"{DEFAULT_METRICS_BASE})")
    up.add_argument("--libvirt-uri", default=env_default("EDGEVM_LIBVIRT_URI", None),
                    help="libvirt connection (default: $EDGEVM_LIBVIRT_URI or qemu:///system)")

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
    for verb in ("get", "cancel"):
        task.add_parser(verb).add_argument("id")
    task.add_parser("watch", help="show a task's progress live until it ends").add_argument("id")

    snap = areas.add_parser("snapshot", help="VM snapshots").add_subparsers(dest="verb", required=True)
    sc = snap.add_parser("create", help="snapshot a VM (internal with memory on bios, disk-only external on uefi)")
    sc.add_argument("vm")
    sc.add_argument("name")
    sc.add_argument("--description", default="")
    sc.add_argument("--no-wait", action="store_true")
    for verb in ("restore", "delete"):
        p = snap.add_parser(verb)
        p.add_argument("vm")
        p.add_argument("name")
        p.add_argument("--no-wait", action="store_true")
    snap.add_parser("list", help="a VM's snapshots as a tree").add_argument("vm")

    net = areas.add_parser("net", help="VRFs, virtual networks, VM network status").add_subparsers(
        dest="verb", required=True)
    vrf = net.add_parser("vrf").add_subparsers(dest="what", required=True)
    vc = vrf.add_parser("create")
    vc.add_argument("name")
    vc.add_argument("subnet", help="IPv4 network, e.g. 10.20.0.0/24")
    vrf.add_parser("list")
    vrf.add_parser("delete").add_argument("name")
    vnet = net.add_parser("vnet").add_subparsers(dest="what", required=True)
    nc_ = vnet.add_parser("create")
    nc_.add_argument("name")
    nc_.add_argument("cidr")
    nc_.add_argument("vni", type=int)
    nc_.add_argument("--peer", action="append", default=[], help="underlay IPv4 of another node (repeat)")
    vnet.add_parser("list")
    vnet.add_parser("delete").add_argument("name")
    net.add_parser("status", help="a VM's network as applied").add_argument("vm")

    flow = areas.add_parser("flow", help="a VM's traffic flows").add_subparsers(dest="verb", required=True)
    fl = flow.add_parser("list")
    fl.add_argument("vm")
    fl.add_argument("--status", choices=["active", "completed", "all"], default="all")
    fl.add_argument("--limit", type=int, default=50)
    ft = flow.add_parser("terminate", help="cut an active flow (tcp reset to both ends)")
    ft.add_argument("vm")
    ft.add_argument("id")
    return parser


class DocumentError(Exception):
    """A spec file that cannot be read, is not YAML or JSON, or is not a mapping; the message names it."""


def load_document(path: str) -> dict[str, Any] | None:
    """Read a YAML or JSON mapping (or nothing: None) from a file or stdin (`-`); DocumentError if not one."""
    name = "stdin" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DocumentError(f"{name}: cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DocumentError(f"{name}: is not UTF-8 text (byte {exc.start})") from None
    try:
        document = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "cannot be parsed"
        raise DocumentError(f"{name}: is not valid YAML or JSON: {problem}{where}") from None
    except yaml.YAMLError as exc:
        raise DocumentError(f"{name}: is not valid YAML or JSON: {exc}") from None
    if document is not None and not isinstance(document, dict):
        kind = "list" if isinstance(document, list) else type(document).__name__
        raise DocumentError(f"{name}: must be a mapping of fields (name: web, ...), not a {kind}")
    return document


async def follow_task(client: Client, task: Task, quiet: bool = False) -> Task:
    """Follow a task on its events until it ends, showing its progress live; return it.

    Subscribes first, then reads the task once, so no update falls between the two; a read every few
    seconds covers a lost event (e.g. a reconnect).
    """
    updates: asyncio.Queue[Task] = asyncio.Queue()

    async def on_event(msg: Any) -> None:
        event = msgspec.json.decode(msg.data)
        updates.put_nowait(msgspec.convert(event["task"], Task))

    sub = await client.nc.subscribe(subjects.event(client.node, f"task.{task.id}"), cb=on_event)
    try:
        task = await client.call("task.get", {"id": task.id}, Task)
        shown = ""
        live = sys.stderr.isatty()
        while True:
            line = progress_line(task)
            if line != shown and not quiet:
                print(("\r\033[K" if live else "") + line, end="" if live else "\n", file=sys.stderr, flush=True)
                shown = line
            if task.finished:
                break
            try:
                newer = await asyncio.wait_for(updates.get(), 3.0)
            except TimeoutError:
                newer = await client.call("task.get", {"id": task.id}, Task)
            if STATUS_RANK.get(newer.status, 2) >= STATUS_RANK.get(task.status, 2):  # events may predate the read
                task = newer
        if live and not quiet:
            print(file=sys.stderr)
        return task
    finally:
        await sub.unsubscribe()


STATUS_RANK = {"queued": 0, "running": 1}  # then an end


def progress_line(task: Task) -> str:
    """Return one line that shows where a task is: status, a bar, the message."""
    percent = 100 if task.status == "succeeded" else task.progress or 0
    bar = "#" * (percent // 5) + "." * (20 - percent // 5)
    return f"{task.kind} {task.id} [{bar}] {percent:3d}% {task.status}: {task.message}"


async def run_command(args: argparse.Namespace) -> int:
    """Connect, send the command `args` stand for, print the reply; return the exit code."""
    async def quiet(error: Exception) -> None:
        # nats-py logs each failed connection attempt with a traceback; main says it in one line instead.
        pass

    nc = await nats.connect(args.nats, connect_timeout=3, max_reconnect_attempts=1, error_cb=quiet)
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
            print_vm(await client.call("vm.create", args.document), args.json)
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
            changes = args.document or {}
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
    if area == "snapshot":
        return await snapshot_verb(client, args)
    if area == "net":
        return await net_verb(client, args)
    if area == "flow":
        return await flow_verb(client, args)
    raise AssertionError(f"unknown verb {area} {verb}")


async def snapshot_verb(client: Client, args: argparse.Namespace) -> int:
    """edgevm snapshot create|list|restore|delete."""
    if args.verb == "list":
        reply = await client.call("snapshot.list", {"vm": args.vm})
        if args.json:
            print_json(reply)
            return 0
        rows = []
        for depth, snap in snapshot_tree(reply["snapshots"]):
            rows.append(["  " * depth + snap["name"] + (" *" if snap["current"] else ""), snap["mode"],
                         snap["vm_state"], snap["created_at"], snap["description"]])
        print_table(["name (* current)", "mode", "vm state", "created", "description"], rows)
        return 0
    body: dict[str, Any] = {"vm": args.vm, "name": args.name}
    if args.verb == "create" and args.description:
        body["description"] = args.description
    return await finish(client, args, await client.call(f"snapshot.{args.verb}", body))


def snapshot_tree(snapshots: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """Return snapshots depth-first from the roots, each with its depth in the tree."""
    children: dict[str | None, list[dict[str, Any]]] = {}
    names = {s["name"] for s in snapshots}
    for snap in sorted(snapshots, key=lambda s: s["created_at"]):
        parent = snap["parent"] if snap["parent"] in names else None
        children.setdefault(parent, []).append(snap)
    out: list[tuple[int, dict[str, Any]]] = []

    def walk(parent: str | None, depth: int) -> None:
        for snap in children.get(parent, []):
            out.append((depth, snap))
            walk(snap["name"], depth + 1)

    walk(None, 0)
    return out


async def net_verb(client: Client, args: argparse.Namespace) -> int:
    """edgevm net vrf|vnet create|list|delete, net status."""
    if args.verb == "status":
        print_json(await client.call("net.status", {"vm": args.vm}))
        return 0
    what = args.what
    if what == "list":
        reply = await client.call(f"net.{args.verb}.list")
        if args.json:
            print_json(reply)
        elif args.verb == "vrf":
            print_table(["name", "subnet", "gateway"], [[v["name"], v["subnet"], v["gateway"]] for v in reply["vrfs"]])
        else:
            print_table(["name", "cidr", "vni", "peers"],
                        [[v["name"], v["cidr"], v["vni"], ", ".join(v["peers"])] for v in reply["vnets"]])
        return 0
    if what == "delete":
        await client.call(f"net.{args.verb}.delete", {"name": args.name})
        return 0
    if args.verb == "vrf":
        body: dict[str, Any] = {"name": args.name, "subnet": args.subnet}
    else:
        body = {"name": args.name, "cidr": args.cidr, "vni": args.vni, "peers": args.peer}
    print_json(await client.call(f"net.{args.verb}.create", body))
    return 0


async def flow_verb(client: Client, args: argparse.Namespace) -> int:
    """edgevm flow list|terminate."""
    if args.verb == "terminate":
        print_json(await client.call("flow.terminate", {"vm": args.vm, "id": args.id}))
        return 0
    reply = await client.call("flow.list", {"vm": args.vm, "status": args.status, "limit": args.limit})
    if args.json:
        print_json(reply)
        return 0
    print_table(["id", "status", "proto", "direction", "source", "destination", "state", "bytes in/out", "started"],
                [[f["id"], f["status"], f["protocol"], f["direction"], f"{f['src_ip']}:{f['src_port']}",
                  f"{f['dst_ip']}:{f['dst_port']}", f["state"], f"{f['bytes_in']}/{f['bytes_out']}", f["started_at"]]
                 for f in reply["flows"]])
    return 0


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
        # The spec file is read before connecting: a bad file is reported as such, NATS up or not.
        args.document = load_document(args.file) if getattr(args, "file", None) is not None else None
    except DocumentError as exc:
        fail(str(exc))
    try:
        raise SystemExit(asyncio.run(run_command(args)))
    except EdgevmError as exc:
        field = f" [{exc.field}]" if exc.field else ""
        fail(f"{exc.code}{field}: {exc.message}")
    except (OSError, nats.errors.NoServersError) as exc:
        fail(f"cannot reach NATS at {args.nats}: {exc}")


if __name__ == "__main__":
    main()
