"""`edgevm net ...` and `edgevm flow ...`: VRFs, virtual networks, a VM's network and its flows."""

from __future__ import annotations

import argparse
from typing import Any

from edgevm.cli.output import print_json, print_reply, print_table
from edgevm.shared.client import Client

VRF_COLUMNS = ["name", "subnet", "gateway"]
VNET_COLUMNS = ["name", "cidr", "vni", "peers"]
FLOW_COLUMNS = ["id", "status", "proto", "direction", "source", "destination", "state", "bytes in/out", "started"]


def vrf_row(vrf: dict[str, Any]) -> list[Any]:
    """A VRF as a table row."""
    return [vrf["name"], vrf["subnet"], vrf["gateway"]]


def vnet_row(vnet: dict[str, Any]) -> list[Any]:
    """A virtual network as a table row."""
    return [vnet["name"], vnet["cidr"], vnet["vni"], ", ".join(vnet["peers"])]


def flow_row(flow: dict[str, Any]) -> list[Any]:
    """A flow as a table row."""
    return [flow["id"], flow["status"], flow["protocol"], flow["direction"], f"{flow['src_ip']}:{flow['src_port']}",
            f"{flow['dst_ip']}:{flow['dst_port']}", flow["state"], f"{flow['bytes_in']}/{flow['bytes_out']}",
            flow["started_at"]]


def print_net_status(status: dict[str, Any]) -> None:
    """Print a VM's network as applied: one field a line, each mapping, network and interface in words."""
    mappings = [f"{m['protocol'] or 'tcp+udp'} {m['host_interface']}:{m['host_port']} -> {m['vm_port']}"
                for m in status["port_mappings"]]
    vnets = [f"{v['network']} {v['virtual_ip']}{' (outbound allowed)' if v.get('allow_outbound') else ''}"
             for v in status["virtual_networks"]]
    interfaces = [f"{i['name']} -> {i['destination']}" for i in status["virtual_interfaces"]]
    print_table(["field", "value"], [
        ["vm", status["vm"]], ["vrf", status["vrf"]], ["ip addresses", ", ".join(status["ip_addresses"])],
        ["port mappings", ", ".join(mappings)], ["virtual networks", ", ".join(vnets)],
        ["virtual interfaces", ", ".join(interfaces)],
    ])


async def net_verb(client: Client, args: argparse.Namespace) -> int:
    """edgevm net vrf|vnet create|list|delete, net status: tables and lines, JSON with --json."""
    if args.verb == "status":
        status = await client.call("net.status", {"vm": args.vm})
        if args.json:
            print_json(status)
        else:
            print_net_status(status)
        return 0
    kind, what = args.verb, args.what
    columns, row = (VRF_COLUMNS, vrf_row) if kind == "vrf" else (VNET_COLUMNS, vnet_row)
    if what == "list":
        reply = await client.call(f"net.{kind}.list")
        print_reply(reply, args.json, columns, [row(v) for v in reply[f"{kind}s"]])
        return 0
    if what == "delete":
        reply = await client.call(f"net.{kind}.delete", {"name": args.name})
        if args.json:
            print_json(reply)
        else:
            print(f"{kind} {args.name} deleted")
        return 0
    if kind == "vrf":
        body: dict[str, Any] = {"name": args.name, "subnet": args.subnet}
    else:
        body = {"name": args.name, "cidr": args.cidr, "vni": args.vni, "peers": args.peer}
    made = await client.call(f"net.{kind}.create", body)
    print_reply(made, args.json, columns, [row(made)])
    return 0


async def flow_verb(client: Client, args: argparse.Namespace) -> int:
    """edgevm flow list|terminate: a table of flows (the terminated one for terminate), JSON with --json."""
    if args.verb == "terminate":
        flow = await client.call("flow.terminate", {"vm": args.vm, "id": args.id})
        print_reply(flow, args.json, FLOW_COLUMNS, [flow_row(flow)])
        return 0
    reply = await client.call("flow.list", {"vm": args.vm, "status": args.status, "limit": args.limit})
    print_reply(reply, args.json, FLOW_COLUMNS, [flow_row(f) for f in reply["flows"]])
    return 0
