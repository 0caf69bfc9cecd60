"""Every verb of `edgevm` but `node up`: read the input, send the command, print the reply."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import msgspec
import nats
import yaml

from edgevm.cli import fleetview
from edgevm.cli.listing import every_vm
from edgevm.cli.network import flow_verb, net_verb
from edgevm.cli.output import fail, print_json, print_table
from edgevm.cli.snapshots import snapshot_verb
from edgevm.cli.tasks import finish
from edgevm.shared.client import Client
from edgevm.shared.errors import EdgevmError
from edgevm.shared.objects import Task
from edgevm.shared.units import format_size


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


async def run_command(args: argparse.Namespace) -> int:
    """Connect, send the command `args` stand for, print the reply; return the exit code."""
    async def quiet(error: Exception) -> None:
        # nats-py logs each failed connection attempt with a traceback; main says it in one line instead.
        pass

    nc = await nats.connect(args.nats, connect_timeout=3, max_reconnect_attempts=1, error_cb=quiet,
                            nkeys_seed=args.client_creds)
    client = Client(nc, args.node, timeout=args.timeout)
    try:
        return await dispatch(client, args)
    finally:
        await nc.drain()


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
        if args.json:
            print_json(reply)
        elif verb == "get":
            print_table(["field", "value"], [[key, format_size(value) if key == "size_bytes" else value]
                                             for key, value in reply.items()])
        else:
            print(f"image {args.name} deleted")
        return 0
    if area == "vm":
        if verb == "create":
            print_vm(await client.call("vm.create", args.document), args.json)
            return 0
        if verb == "list":
            reply = {"vms": await every_vm(lambda body: client.call("vm.list", body), {})}
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
        reply = await client.call(f"task.{verb}", {"id": args.id})
        if args.json:
            print_json(reply)
        else:
            print_table(["field", "value"], [[key, value] for key, value in reply.items() if key != "result"])
        return 0
    if area == "snapshot":
        return await snapshot_verb(client, args)
    if area == "net":
        return await net_verb(client, args)
    if area == "flow":
        return await flow_verb(client, args)
    if area == "fleet":
        return await fleetview.dispatch(client, args)
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


def run_verb(args: argparse.Namespace) -> None:
    """Run the client verb `args` stand for and exit with its code; errors are one line on stderr."""
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

