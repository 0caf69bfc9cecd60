"""`edgevm fleet add-node|remove-node|rotate-node|add-operator|remove-operator`: who belongs to the fleet.

Each command changes fleet.json under the hub's state directory, rewrites the hub's nats-server configuration
from it and, when the hub runs, applies it there: a config reload (SIGHUP to its nats-server, never a restart)
and the sources of the hub's event stream. A node's or operator's seed goes only into the `--out` file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path

import nats

from edgevm.cli.fleetconfig import HubListen, write_hub_config
from edgevm.cli.fleetstate import FleetError, HubState, check_name, new_user_seed, public_key, write_node_creds
from edgevm.cli.secretfile import write_secret
from edgevm.cli.sourcing import set_sources


def running_nats_pid(state: HubState) -> int | None:
    """Return the pid of the hub's running nats-server, or None when it does not run."""
    try:
        pid = int(state.pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    # A stale pid file may name another process by now: only a nats-server run on this config counts.
    if not cmdline or not cmdline[0].endswith(b"nats-server") or str(state.nats_config).encode() not in cmdline:
        return None
    return pid


class NotApplied(Exception):
    """The change is saved in fleet.json, but the running hub could not take it now."""


async def apply(state: HubState, relink: bool = False) -> str:
    """See `_apply`; raise NotApplied when the running hub cannot be reached."""
    try:
        return await _apply(state, relink)
    except (OSError, nats.errors.Error) as exc:
        raise NotApplied(str(exc) or type(exc).__name__) from None


async def _apply(state: HubState, relink: bool = False) -> str:
    """Rewrite the hub's config from fleet.json and apply it to the running hub; return what was done.

    `relink`: close every leaf link after the reload. nats-server re-checks client connections on a reload but
    not leaf links, so a removed (or re-keyed) node would stay linked; the others reconnect within seconds
    (their events wait in their own streams meanwhile) and only the removed one is refused.
    """
    info = state.hub_info()
    if info is None:
        return "the hub has not run yet: it takes the change at its start"
    listen = HubListen(info["host"], info["nats_port"], info["leaf_port"], info["tls"])
    write_hub_config(state, listen)
    pid = running_nats_pid(state)
    if pid is None:
        return "the hub is not running: it takes the change at its next start"
    os.kill(pid, signal.SIGHUP)
    nodes = sorted(state.load().nodes)
    nc = await nats.connect(info["client_url"], nkeys_seed_str=state.seed("admin"), connect_timeout=5,
                            max_reconnect_attempts=3)
    try:
        await set_sources(nc.jetstream(timeout=10), nodes)
    finally:
        await nc.close()
    if relink:
        closed = await close_leaf_links(info["client_url"], state.seed("system"))
        return f"applied to the running hub (configuration reloaded, event sources updated, {closed} leaf " \
               f"link(s) closed to log in again)"
    return "applied to the running hub (configuration reloaded, event sources updated)"


async def close_leaf_links(url: str, system_seed: str) -> int:
    """Close every leaf link of the hub at `url` through its system account; return how many."""
    nc = await nats.connect(url, nkeys_seed_str=system_seed, connect_timeout=5, max_reconnect_attempts=3)
    try:
        reply = json.loads((await nc.request("$SYS.REQ.SERVER.PING.LEAFZ", b"{}", timeout=5)).data)
        server_id = reply["server"]["id"]
        links = [leaf["id"] for leaf in (reply.get("data") or {}).get("leafs") or []]
        for cid in links:
            await nc.request(f"$SYS.REQ.SERVER.{server_id}.KICK", json.dumps({"cid": cid}).encode(), timeout=5)
        return len(links)
    finally:
        await nc.close()


async def add_node(state: HubState, node: str, out: Path, rotate: bool = False) -> str:
    """Add node `node` (or give it a new key with `rotate`) and write its credentials file `out`."""
    check_name("node", node)
    with state.locked():
        state.require_initialized()
        registry = state.load()
        if rotate and node not in registry.nodes:
            raise FleetError(f"node {node!r} is not in the fleet: add it with `edgevm fleet add-node {node}`")
        if not rotate and node in registry.nodes:
            raise FleetError(f"node {node!r} is already in the fleet (a new key: `edgevm fleet rotate-node {node}`)")
        seed = new_user_seed()
        write_node_creds(out, node, seed, (state.ca_dir / "ca.pem").read_text())
        registry.nodes[node] = public_key(seed)
        state.save(registry)
        done = await apply(state, relink=rotate)
    return f"node {node} {'has a new key' if rotate else 'added'}; its credentials are in {out} (mode 0600); {done}"


async def add_operator(state: HubState, name: str, out: Path) -> str:
    """Add operator `name` (commands every node through the hub) and write its seed file `out`."""
    check_name("operator", name)
    with state.locked():
        state.require_initialized()
        registry = state.load()
        if name in registry.operators:
            raise FleetError(f"operator {name!r} already exists (remove it first for a new key)")
        seed = new_user_seed()
        write_secret(out, seed + "\n")
        registry.operators[name] = public_key(seed)
        state.save(registry)
        done = await apply(state)
    return f"operator {name} added; its nkey seed is in {out} (mode 0600); {done}"


async def remove_member(state: HubState, kind: str, name: str) -> str:
    """Remove node or operator `name`: refused from the reload on (a node's leaf link is closed too).

    The events the hub holds of a removed node stay.
    """
    with state.locked():
        state.require_initialized()
        registry = state.load()
        members = registry.nodes if kind == "node" else registry.operators
        if members.pop(name, None) is None:
            raise FleetError(f"{kind} {name!r} is not in the fleet")
        state.save(registry)
        done = await apply(state, relink=kind == "node")
    return f"{kind} {name} removed; {done}"

async def run_admin_verb(args: argparse.Namespace) -> str:
    """Run one fleet set-up verb; return the line to print."""
    state = HubState(args.state_dir)
    if args.verb == "add-node":
        return await add_node(state, args.name, args.out)
    if args.verb == "rotate-node":
        return await add_node(state, args.name, args.out, rotate=True)
    if args.verb == "add-operator":
        return await add_operator(state, args.name, args.out)
    return await remove_member(state, "node" if args.verb == "remove-node" else "operator", args.name)


def main(args: argparse.Namespace) -> int:
    """Run `edgevm fleet <set-up verb>`: 0 done, else the reason on stderr."""
    try:
        print(asyncio.run(run_admin_verb(args)))
    except FleetError as exc:
        raise SystemExit(f"edgevm fleet {args.verb}: {exc}") from None
    except NotApplied as exc:
        raise SystemExit(f"edgevm fleet {args.verb}: the change is saved, but the running hub could not take it: "
                         f"{exc}; it takes it at its next start") from None
    except OSError as exc:  # e.g. --out in a directory that does not exist: nothing was changed
        raise SystemExit(f"edgevm fleet {args.verb}: {exc.strerror or exc}: {exc.filename or ''} "
                         f"(nothing was changed)") from None
    return 0
