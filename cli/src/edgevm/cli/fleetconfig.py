"""The nats-server configurations of a fleet: the hub's (listeners, JetStream domain, who may do what) and a
node's leaf-node uplink. Written as JSON, which nats-server's config parser reads as it is.

Leaf-node permissions are those of the node's user at the hub, seen from the node: `publish` is what the node
may send into the hub, `subscribe` what the hub may send to the node (nats-server reverses them inside the hub).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevm.cli.fleetstate import HUB_DOMAIN, HubState, Registry, public_key
from edgevm.cli.natsserver import MAX_PAYLOAD
from edgevm.cli.secretfile import write_secret
from edgevm.shared import subjects

# How often a node's nats-server retries its uplink: nats-server waits this long plus a random jitter of up to
# as much again between attempts (a fixed interval, not a growing one), and 30 s after a permissions violation.
LEAF_RECONNECT = "2s"


def node_permissions(node: str) -> dict[str, Any]:
    """Return what node `node`'s user may do at the hub (see DESIGN.md "Security")."""
    return {
        "publish": {"allow": [
            subjects.all_events(node),  # its own events, live (the hub's stream sources them from the node)
            # Replies to the commands it took. `allow_responses` alone is not enough across a leaf link: the hub
            # forwards a requester's reply-subject interest to a leaf only for subjects the leaf may publish to.
            "_INBOX.>",
            "$JSC.R.>",  # replies of its JetStream to the hub's source-consumer requests
            "$JS.S.>",  # its stream's messages and heartbeats pushed to the hub's sourcing stream
        ]},
        "subscribe": {"allow": [
            subjects.command(node, ">"),  # its own commands
            f"$JS.{node}.API.>",  # its own JetStream domain, served to the hub
            "$JS.FC.>",  # the hub's flow-control answers to its source consumer
            "$SRV.>",  # nats micro discovery ($SRV.PING/INFO/STATS) of its services
        ]},
        "allow_responses": True,
    }


GATEWAY_PERMISSIONS: dict[str, Any] = {
    "publish": {"allow": [
        "$JS.API.>", f"$JS.{HUB_DOMAIN}.API.>", "$JS.ACK.>", "$JS.FC.>", "$KV.>", "_INBOX.>", "$SRV.>",
        subjects.all_events(HUB_DOMAIN),  # its own heartbeats (kept in EDGEVM_HUB_EVENTS)
    ]},
    "subscribe": {"allow": [subjects.all_events(), f"{subjects.GATEWAY}.>", "_INBOX.>", "$SRV.>"]},
    "allow_responses": True,
}


@dataclass(frozen=True)
class HubListen:
    """Where the hub listens."""

    host: str
    nats_port: int
    leaf_port: int
    tls: bool = True


def hub_config(state: HubState, registry: Registry, listen: HubListen) -> dict[str, Any]:
    """Return the hub's nats-server configuration for the fleet in `registry`."""
    users: list[dict[str, Any]] = [
        {"nkey": public_key(state.seed("admin"))},  # the hub's own identity: everything
        {"nkey": public_key(state.seed("gateway")), "permissions": GATEWAY_PERMISSIONS},
    ]
    users += [{"nkey": key} for _, key in sorted(registry.operators.items())]  # an operator commands every node
    users += [{"nkey": key, "permissions": node_permissions(node)} for node, key in sorted(registry.nodes.items())]
    leafnodes: dict[str, Any] = {
        "host": listen.host,
        "port": listen.leaf_port,
        # Without it the hub advertises its other leaf URLs and a node may bypass the URL it was given.
        "no_advertise": True,
    }
    if listen.tls:
        leafnodes["tls"] = {"cert_file": str(state.tls_dir / "hub.pem"), "key_file": str(state.tls_dir / "hub.key"),
                            "timeout": 5}
    return {
        "server_name": "edgevm-hub",
        "host": listen.host,
        "port": listen.nats_port,
        "max_payload": MAX_PAYLOAD,
        "pid_file": str(state.pid_file),
        "jetstream": {"store_dir": str(state.nats_dir), "domain": HUB_DOMAIN},
        "leafnodes": leafnodes,
        "authorization": {"users": users},
        # The hub's system identity: `fleet remove-node` closes leaf links through it (a reload leaves them).
        "accounts": {"SYS": {"users": [{"nkey": public_key(state.seed("system"))}]}},
        "system_account": "SYS",
    }


def node_leaf_config(node: str, hub_url: str, seed: str, ca_file: Path | None, store_dir: Path) -> dict[str, Any]:
    """Return the parts of a node's nats-server configuration that make it a leaf node of the hub."""
    remote: dict[str, Any] = {"url": hub_url, "nkey": seed}
    if ca_file is not None:
        remote["tls"] = {"ca_file": str(ca_file), "timeout": 5}
    return {
        "jetstream": {"store_dir": str(store_dir), "domain": node},
        "leafnodes": {"reconnect": LEAF_RECONNECT, "remotes": [remote]},
    }


def render(config: dict[str, Any]) -> str:
    """Return `config` as a nats-server configuration file."""
    return json.dumps(config, indent=2) + "\n"


def write_hub_config(state: HubState, listen: HubListen) -> None:
    """Write the hub's nats-server configuration for the fleet as it is now in fleet.json."""
    write_secret(state.nats_config, render(hub_config(state, state.load(), listen)))
