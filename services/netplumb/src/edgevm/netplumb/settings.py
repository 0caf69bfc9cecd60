"""Netplumb's own settings, read from the environment with defaults that work on a fresh host.

- `EDGEVM_DEFAULT_SUBNET` (default 10.77.0.0/24): the subnet of the `default` VRF, created at start-up
  when the node has none; changing it later does not move an existing default VRF.
- `EDGEVM_NETNS_PREFIX` (default `edgevm-`): VRF `red` lives in namespace `<prefix>red`.
- `EDGEVM_NODE_NETNS` (default: none): a named namespace to use as the node's world instead of the one the
  process runs in (its NATS connection stays in the process's own namespace).
- `EDGEVM_VXLAN_LOCAL` (default: found): the node's underlay address for virtual networks; by default the
  source address the node would use to reach a network's first peer.
- `EDGEVM_NET_RECONCILE_INTERVAL` (default 60 s, 0 = never): how often the kernel is checked against
  `edgevm_net` and repaired, besides start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from edgevm.netplumb import names

DEFAULT_SUBNET = IPv4Network("10.77.0.0/24")
# VRFs a node holds besides `default` (docs/protocol.md, Limits). Each costs a namespace, two bridges, two veth
# pairs, sysctls and an nft table, and a reconcile verifies every one (~10 ms each): at 512 a whole pass stays
# near 5 s, made in parts. Fixed by design, not by the environment; a test may pass a smaller one.
MAX_VRFS = 512


@dataclass(frozen=True)
class Settings:
    """How netplumb plumbs this node."""

    default_subnet: IPv4Network = DEFAULT_SUBNET
    netns_prefix: str = names.DEFAULT_NETNS_PREFIX
    node_netns: str | None = None
    vxlan_local: IPv4Address | None = None
    reconcile_interval: float = 60.0
    max_vrfs: int = MAX_VRFS

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        """Read the EDGEVM_* variables above from `env` (default: os.environ)."""
        env = dict(os.environ) if env is None else env
        local = env.get("EDGEVM_VXLAN_LOCAL")
        return cls(
            default_subnet=IPv4Network(env.get("EDGEVM_DEFAULT_SUBNET") or DEFAULT_SUBNET, strict=True),
            netns_prefix=env.get("EDGEVM_NETNS_PREFIX") or names.DEFAULT_NETNS_PREFIX,
            node_netns=env.get("EDGEVM_NODE_NETNS") or None,
            vxlan_local=IPv4Address(local) if local else None,
            reconcile_interval=float(env.get("EDGEVM_NET_RECONCILE_INTERVAL") or 60.0),
        )
