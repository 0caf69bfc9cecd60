"""The `edgevm` command: its verbs and flags. `node up` runs the node; every other verb is a client of the protocol."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from edgevm.cli import fleetsetup, fleetview
from edgevm.shared.config import DEFAULT_METRICS_BASE, default_node_id


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
                        help="node id: whose subjects edgevm.<node>.* to use, also through a hub "
                             "(default: $EDGEVM_NODE or this host's name)")
    parser.add_argument("--creds", dest="client_creds", default=os.environ.get("EDGEVM_CREDS") or None,
                        help="nkey seed file to log in with, e.g. an operator's at a hub (default: $EDGEVM_CREDS)")
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
    up.add_argument("--hub", default=env_default("EDGEVM_HUB", None),
                    help="join a fleet: the hub's leaf-node URL, nats-leaf://HOST:7422 (default: $EDGEVM_HUB)")
    up.add_argument("--creds", type=Path, default=env_default("EDGEVM_HUB_CREDS", None),
                    help="this node's credentials file from `edgevm fleet add-node` (default: $EDGEVM_HUB_CREDS)")
    fleetsetup.add_hub_parser(areas)

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
    for verb in ("create", "restore", "delete"):
        snap.choices[verb].add_argument(
            "--request-id", help="send the request with this id (default: a new one); the same id within 15 min "
                                 "answers the same task instead of starting another")
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

    # One `fleet` group: the gateway's read verbs (fleetview) and the hub's set-up verbs register into it.
    # A verb that runs without a NATS connection sets `local` (a function of args returning the exit code).
    fleet = areas.add_parser("fleet", help="the fleet through the gateway, and the hub's set-up").add_subparsers(
        dest="verb", required=True)
    fleetview.register(fleet)
    fleetsetup.add_fleet_verbs(fleet)
    add_node_option(parser)
    return parser


def add_node_option(parser: argparse.ArgumentParser) -> None:
    """Let every verb take `--node` after it too (`edgevm vm list --node n1`), as well as before the area."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                add_node_option(sub)
            return
    if "--node" not in parser._option_string_actions:
        # SUPPRESS: only a given --node replaces the global one (and its default).
        parser.add_argument("--node", default=argparse.SUPPRESS, help="node id (as before the area)")


def main(argv: list[str] | None = None) -> None:
    """Entry point of `edgevm`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Each side imports only what it uses: the launcher of `node up` lives as long as the node, and the
    # client's stack (nats-py, msgspec, YAML) would stay in its memory all that time.
    if getattr(args, "local", None) is not None:  # a verb that runs here without a NATS connection
        raise SystemExit(args.local(args))
    if args.area == "node":
        if (args.hub is None) != (args.creds is None):
            parser.error("node up: --hub and --creds go together (the hub's URL and this node's credentials)")
        from edgevm.cli.supervisor import NodeOptions, Supervisor

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
        options = NodeOptions(
            node=args.node,
            state_dir=args.state_dir,
            nats_url=args.external_nats,
            nats_host=args.listen,
            nats_port=args.nats_port,
            metrics_base_port=args.metrics_base_port,
            libvirt_uri=args.libvirt_uri,
            hub_url=args.hub,
            creds=args.creds,
        )
        asyncio.run(Supervisor(options).run())
        return
    from edgevm.cli.verbs import run_verb

    run_verb(args)


if __name__ == "__main__":
    main()
