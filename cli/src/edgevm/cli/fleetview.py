"""`edgevm fleet nodes|vms|tasks|flows`: the whole fleet as the gateway sees it (`edgevm.gw.*`).

The `fleet` group is made once in `__main__.build_parser`; this module adds its read verbs with
`register`, and the hub's set-up verbs (add-node, remove-node, add-operator) register beside them.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `node up` parses its arguments with this module: no client stack in its memory
    from edgevm.shared.client import Client

VERBS = ("nodes", "vms", "tasks", "flows")
VM_STATES = ("defined", "starting", "running", "stopping", "stopped", "crashed", "error")


def register(fleet: Any) -> None:
    """Add the read verbs to the `fleet` subparsers (the action `add_subparsers` returned)."""
    nodes = fleet.add_parser("nodes", help="every node: up or unreachable, last heartbeat, VMs, live services")
    nodes.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the reply as JSON")
    vms = fleet.add_parser("vms", help="every VM of the fleet (the last known state of an unreachable node's)")
    node_filter(vms)
    vms.add_argument("--status", choices=VM_STATES, help="only VMs in this state")
    tasks = fleet.add_parser("tasks", help="recent tasks of the fleet, newest first")
    node_filter(tasks)
    tasks.add_argument("--vm", help="only this VM's tasks")
    tasks.add_argument("--limit", type=int, default=50, help="at most this many (1..500, default 50)")
    flows = fleet.add_parser("flows", help="traffic flows of the fleet, newest first")
    node_filter(flows)
    flows.add_argument("--vm", help="only this VM's flows")
    flows.add_argument("--status", choices=["active", "completed", "all"], default="all")
    flows.add_argument("--limit", type=int, default=100, help="at most this many (1..500, default 100)")


def node_filter(parser: argparse.ArgumentParser) -> None:
    """Add `--node` (here a filter: only this node's objects, not the node commands go to) and `--json`."""
    parser.add_argument("--node", dest="filter_node", metavar="NODE", default=None, help="only this node's")
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the reply as JSON")


def _marked(node: str, node_state: str) -> str:
    return node if node_state == "up" else f"{node} (unreachable)"


async def dispatch(client: Client, args: argparse.Namespace) -> int:
    """Run one read verb of `edgevm fleet`; return the exit code."""
    from edgevm.cli.listing import every_vm
    from edgevm.cli.output import print_json, print_table
    from edgevm.shared.units import format_size

    node = {"node": args.filter_node} if getattr(args, "filter_node", None) else {}
    if args.verb == "nodes":
        reply = await client.gateway("node.list", {})
        if args.json:
            print_json(reply)
            return 0
        print_table(["node", "state", "last seen", "vms", "services"],
                    [[n["node"], n["state"], n["last_seen"] or "never", n["vms"], ", ".join(n["services"])]
                     for n in reply["nodes"]])
        return 0
    if args.verb == "vms":
        reply = {"vms": await every_vm(lambda body: client.gateway("vm.list", body), node)}
        if args.status:
            reply["vms"] = [v for v in reply["vms"] if v["status"]["state"] == args.status]
        if args.json:
            print_json(reply)
            return 0
        print_table(["node", "name", "state", "cpu", "memory", "image", "updated"],
                    [[_marked(v["node"], v["node_state"]), v["spec"]["name"], v["status"]["state"], v["spec"]["cpu"],
                      format_size(v["spec"]["memory"]), v["spec"]["image"], v["status"]["updated_at"]]
                     for v in reply["vms"]])
        return 0
    if args.verb == "tasks":
        body = {**node, "limit": args.limit, **({"vm": args.vm} if args.vm else {})}
        reply = await client.gateway("task.list", body)
        if args.json:
            print_json(reply)
            return 0
        print_table(["id", "node", "kind", "vm", "status", "progress", "created", "message"],
                    [[t["id"], _marked(t["node"], t["node_state"]), t["kind"], t["vm"], t["status"], t["progress"],
                      t["created_at"], t["error"] or t["message"]] for t in reply["tasks"]])
        return 0
    body = {**node, "status": args.status, "limit": args.limit, **({"vm": args.vm} if args.vm else {})}
    reply = await client.gateway("flow.list", body)
    if args.json:
        print_json(reply)
        return 0
    print_table(["id", "node", "vm", "status", "proto", "source", "destination", "bytes in/out", "started"],
                [[f["id"], _marked(f["node"], f["node_state"]), f["vm"], f["status"], f["protocol"],
                  f"{f['src_ip']}:{f['src_port']}", f"{f['dst_ip']}:{f['dst_port']}",
                  f"{f['bytes_in']}/{f['bytes_out']}", f["started_at"]] for f in reply["flows"]])
    return 0
