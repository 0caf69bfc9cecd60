"""A node's uplink to its fleet's hub: the leaf-node settings of its nats-server, and what the link does.

nats-server keeps the link itself: it dials the hub, retries every LEAF_RECONNECT plus a random jitter of up
to as much again (a fixed interval, not a growing one; 30 s after a permissions violation), and re-subscribes
when the link returns. The node never waits for it: its services talk to their local nats-server only.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevm.cli.fleetconfig import node_leaf_config
from edgevm.cli.fleetstate import FleetError, read_node_creds

URL = re.compile(r"^(nats-leaf|tls|nats)://[^\s/]+:\d+$")


@dataclass(frozen=True)
class Uplink:
    """The uplink of a node that was asked to join a fleet; `config` is None when it cannot (see `problem`)."""

    hub_url: str
    config: dict[str, Any] | None
    problem: str | None = None


def uplink(node: str, hub_url: str, creds_path: Path, nats_dir: Path) -> Uplink:
    """Return the leaf-node settings for `node` from `--hub` and `--creds`, or why there are none.

    A bad flag does not stop the node: it runs on its own, and the message says what to fix.
    """
    if not URL.match(hub_url):
        return Uplink(hub_url, None, f"--hub {hub_url!r} must be a URL like nats-leaf://HOST:7422")
    try:
        creds = read_node_creds(creds_path)
    except FleetError as exc:
        return Uplink(hub_url, None, str(exc))
    if creds.node != node:
        return Uplink(hub_url, None, f"--creds {creds_path} belongs to node {creds.node!r}, and this node is "
                                     f"{node!r} (give --node {creds.node}, or make creds for {node!r})")
    ca_file = nats_dir / "fleet-ca.pem"
    nats_dir.mkdir(parents=True, exist_ok=True)
    ca_file.write_text(creds.ca_pem)
    url = re.sub(r"^(tls|nats)://", "nats-leaf://", hub_url)
    return Uplink(hub_url, node_leaf_config(node, url, creds.seed, ca_file, nats_dir))


# What nats-server logs about the leaf link: the state it means, and what a person should read instead.
_LINES: list[tuple[re.Pattern[str], str, str]] = [
    # Logged once the hub accepted the node (a TCP connection alone is "Leafnode connection created").
    (re.compile(r"JetStream using domains"), "up", "up: connected to the hub {hub}"),
    (re.compile(r"Authorization Violation|authorization violation|Authentication", re.I), "refused",
     "refused by the hub {hub}: Authorization Violation (this node's credentials are wrong, or the node was "
     "removed or given a new key at the hub); retrying"),
    (re.compile(r"x509|certificate|tls:", re.I), "tls", "TLS with the hub {hub} failed: {detail}; retrying"),
    (re.compile(r"Error trying to connect as leafnode"), "unreachable",
     "cannot reach the hub {hub}: {detail}; retrying"),
    (re.compile(r"Leafnode connection closed"), "down", "down: lost the link to the hub {hub}; retrying"),
]


def describe(line: str, hub: str) -> tuple[str, str] | None:
    """Return the uplink state a nats-server log line tells and a plain sentence (None: not about it)."""
    if "eafnode" not in line and "Authorization" not in line and "x509" not in line and "domains" not in line:
        return None
    for pattern, state, text in _LINES:
        if pattern.search(line):
            detail = line.split("] ", 1)[-1].split(" - ")[-1].strip()
            return state, "hub link " + text.format(hub=hub, detail=detail)
    return None


async def follow_link(log_file: Path, hub: str, offset: int = 0, poll: float = 0.5) -> None:
    """Print each change of the uplink's state read from the node's nats-server log (from byte `offset` on),
    until cancelled. A refused or failing link is told once, not at every retry."""
    last = ""
    while True:
        await asyncio.sleep(poll)
        try:
            with log_file.open("rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
        except FileNotFoundError:
            continue
        complete = chunk.rfind(b"\n") + 1
        offset += complete
        for raw in chunk[:complete].decode(errors="replace").splitlines():
            told = describe(raw, hub)
            if told is None or told[0] == last or (told[0] == "down" and last != "up"):
                continue
            last = told[0]
            print(f"edgevm node: {told[1]}", flush=True)
