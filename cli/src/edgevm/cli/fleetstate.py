"""The hub's state directory: the fleet's identities (nkeys), its CA, and the files a node or operator gets.

Layout under H (`--state-dir`):
  fleet.json            who belongs to the fleet: nodes and operators by public nkey (no secrets)
  keys/admin.seed       the hub's own identity (stream set-up, fleet commands), 0600
  keys/gateway.seed     the gateway's identity (reads every event, serves edgevm.gw.*), 0600
  keys/system.seed      the hub's system-account identity (closes the leaf links of removed nodes), 0600
  ca/ca.pem, ca.key     the fleet's CA (key 0600); tls/hub.pem, hub.key: the leaf listener's certificate
  nats/                 the hub's nats-server: its generated config, pid file, JetStream store
  hub.json              where the running hub listens (for the fleet commands)
A node's or an operator's seed is written only to the `--out` file it is handed over in, never kept here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nkeys

from edgevm.cli.secretfile import write_secret

NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
HUB_DOMAIN = "hub"
# A node's id is the second token of its command subjects and its JetStream domain: these would collide with
# the hub's domain, the gateway's, the events', the flow log's and the snapshot work queue's subjects.
RESERVED_NODE_NAMES = frozenset({HUB_DOMAIN, "gw", "evt", "flowlog", "work"})
CREDS_FORMAT = "edgevm-fleet-creds/1"
IDENTITIES = ("admin", "gateway", "system")  # the hub's own


class FleetError(Exception):
    """A fleet command that cannot be done; the message says why (and changes nothing)."""


def check_name(kind: str, name: str) -> None:
    """Raise FleetError unless `name` is a valid (and, for a node, unreserved) name."""
    if not NAME.match(name):
        raise FleetError(f"{kind} name {name!r} must match {NAME.pattern} (lower-case letters, digits, '-')")
    if kind == "node" and name in RESERVED_NODE_NAMES:
        raise FleetError(f"node name {name!r} is reserved (it would collide with edgevm.{name}.* subjects "
                         f"or the hub's JetStream domain); choose another")


def new_user_seed() -> str:
    """Return a fresh nkey user seed (`SU...`)."""
    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()


def public_key(seed: str) -> str:
    """Return the public key (`U...`) of a user seed."""
    return nkeys.from_seed(bytearray(seed.encode())).public_key.decode()  # type: ignore[no-any-return]


@dataclass
class Registry:
    """Who belongs to the fleet: public nkeys of nodes and operators (fleet.json)."""

    nodes: dict[str, str] = field(default_factory=dict)
    operators: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HubState:
    """Paths and contents of a hub's state directory."""

    root: Path

    @property
    def registry_path(self) -> Path:
        return self.root / "fleet.json"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def nats_dir(self) -> Path:
        return self.root / "nats"

    @property
    def nats_config(self) -> Path:
        return self.nats_dir / "nats-server.conf"

    @property
    def pid_file(self) -> Path:
        return self.nats_dir / "nats-server.pid"

    @property
    def hub_info_path(self) -> Path:
        return self.root / "hub.json"

    def seed_path(self, identity: str) -> Path:
        """Return the seed file of the hub's own identity `admin`, `gateway` or `system`."""
        return self.keys_dir / f"{identity}.seed"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the state directory's lock (one fleet change at a time)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def is_initialized(self) -> bool:
        """Return whether the hub's first start has made the identities and the CA."""
        made = [self.registry_path, self.ca_dir / "ca.pem", *(self.seed_path(i) for i in IDENTITIES)]
        return all(path.exists() for path in made)

    def initialize(self) -> None:
        """Make the hub's own identities, the CA and the registry unless they exist (the hub's first start)."""
        from edgevm.cli.fleetca import ensure_ca

        ensure_ca(self.ca_dir)
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        for identity in IDENTITIES:
            path = self.seed_path(identity)
            if not path.exists():
                write_secret(path, new_user_seed() + "\n")
        if not self.registry_path.exists():
            self.save(Registry())

    def require_initialized(self) -> None:
        """Raise FleetError unless `edgevm hub up` has run once on this state directory."""
        if not self.is_initialized():
            raise FleetError(f"{self.root} holds no hub: run `edgevm hub up --state-dir {self.root}` once first")

    def seed(self, identity: str) -> str:
        """Return the seed of the hub's own identity `admin` or `gateway`."""
        return self.seed_path(identity).read_text().strip()

    def load(self) -> Registry:
        """Read fleet.json."""
        data = json.loads(self.registry_path.read_text())
        return Registry(nodes=dict(data.get("nodes", {})), operators=dict(data.get("operators", {})))

    def save(self, registry: Registry) -> None:
        """Write fleet.json atomically."""
        tmp = self.registry_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"nodes": registry.nodes, "operators": registry.operators}, indent=2) + "\n")
        os.replace(tmp, self.registry_path)

    def hub_info(self) -> dict[str, Any] | None:
        """Return what the running (or last) hub wrote about where it listens, or None."""
        try:
            return dict(json.loads(self.hub_info_path.read_text()))
        except (OSError, ValueError):
            return None


def write_node_creds(path: Path, node: str, seed: str, ca_pem: str) -> None:
    """Write the one file node `node` needs to join: its seed and the fleet's CA (mode 0600)."""
    write_secret(path, json.dumps({"format": CREDS_FORMAT, "node": node, "seed": seed, "ca": ca_pem}, indent=2)
                 + "\n")


@dataclass(frozen=True)
class NodeCreds:
    """What `edgevm node up --creds FILE` read from FILE."""

    node: str
    seed: str
    ca_pem: str


def read_node_creds(path: Path) -> NodeCreds:
    """Read a node's credentials file; FleetError naming the file and what is wrong (never the seed)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FleetError(f"--creds {path}: no such file (make one with `edgevm fleet add-node NAME --out FILE` "
                         f"on the hub)") from None
    except OSError as exc:
        raise FleetError(f"--creds {path}: cannot be read: {exc.strerror or exc}") from None
    except ValueError:
        raise FleetError(f"--creds {path}: is not an edgevm fleet credentials file (not JSON)") from None
    if not isinstance(data, dict) or data.get("format") != CREDS_FORMAT:
        raise FleetError(f"--creds {path}: is not an edgevm fleet credentials file (format must be {CREDS_FORMAT})")
    node, seed, ca = data.get("node"), data.get("seed"), data.get("ca")
    if not isinstance(node, str) or not isinstance(seed, str) or not isinstance(ca, str):
        raise FleetError(f"--creds {path}: node, seed and ca must be strings")
    try:
        public_key(seed)
    except Exception:
        raise FleetError(f"--creds {path}: seed is not a valid nkey user seed") from None
    if "BEGIN CERTIFICATE" not in ca:
        raise FleetError(f"--creds {path}: ca is not a PEM certificate")
    return NodeCreds(node, seed, ca)
