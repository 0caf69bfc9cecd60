"""The command line of a fleet's set-up: `edgevm hub up` and `edgevm fleet add-node|...` (PROTOCOL.md "Fleet").

Only the flags live here; each verb imports its module when it runs (`local`: it needs no NATS connection).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from edgevm.shared.config import DEFAULT_METRICS_BASE, SERVICES

HUB_STATE_DIR = os.environ.get("EDGEVM_HUB_STATE_DIR") or "/var/lib/edgevm-hub"
STATE_HELP = "the hub's state directory (default: $EDGEVM_HUB_STATE_DIR or /var/lib/edgevm-hub)"


def _hub_up(args: argparse.Namespace) -> int:
    from edgevm.cli import hub

    return hub.main(args)


def _fleet_verb(args: argparse.Namespace) -> int:
    from edgevm.cli import fleet

    return fleet.main(args)


def add_hub_parser(areas: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `edgevm hub up`."""
    hub = areas.add_parser("hub", help="run the fleet's hub").add_subparsers(dest="verb", required=True)
    up = hub.add_parser("up", help="the hub's NATS (leaf nodes, JetStream domain hub) and gateway; Ctrl-C stops")
    up.add_argument("--state-dir", type=Path, default=HUB_STATE_DIR, help=STATE_HELP)
    up.add_argument("--listen", default="0.0.0.0", help="address of the client and leaf-node listeners (0.0.0.0)")
    up.add_argument("--nats-port", type=int, default=4222, help="client port (4222)")
    up.add_argument("--leaf-port", type=int, default=7422, help="leaf-node port the nodes connect to (7422)")
    up.add_argument("--no-tls", dest="tls", action="store_false",
                    help="plain TCP on the leaf link (default: TLS with a certificate from the fleet's CA)")
    up.add_argument("--tls-name", action="append", default=[],
                    help="a DNS name or IP the nodes reach the hub by, for its certificate (repeat)")
    up.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_BASE + SERVICES.index("gateway"),
                    help="the gateway's metrics port")
    up.add_argument("--no-gateway", dest="gateway", action="store_false", help="do not run the gateway here")
    up.add_argument("--no-source-watch", dest="source_watch", action="store_false",
                    help="leave an idle event source to nats-server's own retries (to measure them)")
    up.set_defaults(local=_hub_up)


def add_fleet_verbs(fleet: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the verbs that change who belongs to the fleet to `edgevm fleet`."""
    def verb(name: str, what: str, out: str | None) -> None:
        parser = fleet.add_parser(name, help=what)
        parser.add_argument("name")
        parser.add_argument("--state-dir", type=Path, default=HUB_STATE_DIR, help=STATE_HELP)
        if out is not None:
            parser.add_argument("--out", type=Path, required=True, help=out)
        parser.set_defaults(local=_fleet_verb)

    creds = "file to write the node's credentials to (mode 0600): the one file `node up --creds` takes"
    verb("add-node", "add a node (applied to the running hub by a config reload)", creds)
    verb("rotate-node", "give a node a new key; its old one is refused from the reload on", creds)
    verb("remove-node", "remove a node: its link is refused from the reload on", None)
    verb("add-operator", "add an operator, who commands every node through the hub",
         "file to write the operator's nkey seed to (mode 0600): nats.connect(url, nkeys_seed=FILE)")
    verb("remove-operator", "remove an operator", None)
