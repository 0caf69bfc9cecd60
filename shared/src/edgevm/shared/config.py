"""Settings of a node's services, read from the environment with defaults that work on a fresh host."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

# Each service has its own metrics port: base + its index here (EDGEVM_METRICS_PORT overrides for one).
SERVICES = ("lifecycle", "netplumb", "snapshotter", "flowwatch", "gateway")
DEFAULT_METRICS_BASE = 9461


def default_node_id() -> str:
    """Return the host name made into a valid node id."""
    name = re.sub(r"[^a-z0-9-]", "-", socket.gethostname().split(".")[0].lower()).strip("-")
    return name[:63] or "node"


NETWORK_MODES = ("netplumb", "none")


@dataclass(frozen=True)
class Config:
    """The settings every service reads; build it with `from_env`."""

    node: str
    nats_url: str
    state_dir: Path
    libvirt_uri: str
    metrics_host: str
    metrics_base_port: int
    metrics_port: int | None
    log_level: str
    network: str = "netplumb"  # "none": VMs get no NIC (a node without netplumb, e.g. libvirt's test driver)
    nats_seed_file: str | None = None  # EDGEVM_NATS_SEED: an nkey seed file to log in to NATS with (at a hub)

    def __post_init__(self) -> None:
        if self.network not in NETWORK_MODES:
            raise ValueError(f"EDGEVM_NETWORK must be one of {', '.join(NETWORK_MODES)}, not {self.network!r}")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        """Read EDGEVM_* variables from `env` (default: os.environ)."""
        env = dict(os.environ) if env is None else env
        port = env.get("EDGEVM_METRICS_PORT")
        return cls(
            node=env.get("EDGEVM_NODE") or default_node_id(),
            nats_url=env.get("EDGEVM_NATS_URL", "nats://127.0.0.1:4222"),
            state_dir=Path(env.get("EDGEVM_STATE_DIR", "/var/lib/edgevm")),
            libvirt_uri=env.get("EDGEVM_LIBVIRT_URI", "qemu:///system"),
            metrics_host=env.get("EDGEVM_METRICS_HOST", "127.0.0.1"),
            metrics_base_port=int(env.get("EDGEVM_METRICS_BASE_PORT", DEFAULT_METRICS_BASE)),
            metrics_port=int(port) if port else None,
            log_level=env.get("EDGEVM_LOG_LEVEL", "INFO"),
            network=env.get("EDGEVM_NETWORK", "netplumb"),
            nats_seed_file=env.get("EDGEVM_NATS_SEED") or None,
        )

    def metrics_port_for(self, service: str) -> int:
        """Return the metrics port of `service` (0 means: any free port)."""
        if self.metrics_port is not None:
            return self.metrics_port
        return self.metrics_base_port + SERVICES.index(service)

    def service_dir(self, service: str) -> Path:
        """Return (and create) the state directory that belongs to `service`."""
        path = self.state_dir / service
        path.mkdir(parents=True, exist_ok=True)
        return path
