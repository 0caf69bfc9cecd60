"""The cloud-init network-config (v2) that gives a guest its static address, matched by MAC.

Written by hand in the plainest block style, which real cloud-init and the test guest's netplan.awk both
read. The default route is `to: 0.0.0.0/0` (older cloud-init releases do not know `to: default`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edgevm.shared.netstate import NicRecord

RESOLV_CONF = Path("/etc/resolv.conf")


def node_nameservers(path: Path = RESOLV_CONF) -> list[str]:
    """The node's IPv4 name servers a guest can reach through the NAT (loopback ones are the node's own)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver" and "." in parts[1] and not parts[1].startswith("127."):
            found.append(parts[1])
    return found[:3]


def network_config(nics: Sequence[NicRecord], nameservers: Sequence[str] = ()) -> str:
    """A netplan v2 document: each NIC matched by MAC and named; bridge NICs get address and gateway."""
    lines = ["version: 2", "ethernets:"]
    for nic in nics:
        name = nic.name or f"eth{nic.index}"
        lines += [f"  {name}:", "    match:", f'      macaddress: "{nic.mac}"', f"    set-name: {name}"]
        lines.append("    dhcp4: false")
        if nic.kind == "passthrough":
            lines.append("    optional: true")  # its network is the host interface's: the guest configures it
            continue
        lines += ["    addresses:", f"      - {nic.address}"]
        lines += ["    routes:", "      - to: 0.0.0.0/0", f"        via: {nic.gateway}"]
        if nameservers:
            lines += ["    nameservers:", f"      addresses: [{', '.join(nameservers)}]"]
    return "\n".join(lines) + "\n"
