"""A small node built from real namespaces, the way netplumb lays one out, for flowwatch's service tests.

    ext (172.31.255.1) --- n0 [node namespace 172.31.255.2] --- up-a 10.255.1.0/31 --- [VRF a] --- [VM a 10.0.0.5]
                                    |                      \\-- up-b 10.255.2.0/31 --- [VRF b] --- [VM b 10.0.0.5]
                                    \\-- vd 10.0.0.1/24 --- [VM d 10.0.0.5] (the default VRF: the node namespace)

The three VMs have the same address, each in its own VRF. Host port mappings are the double DNAT netplumb writes:
the node namespace DNATs a host port of n0 to the VRF's uplink address, the VRF namespace DNATs it to the
VM; VRFs masquerade out of their uplink and the node masquerades out of n0. Every namespace is named
`edgevm-t-<random>-<role>` and removed by `remove()`, which runs even after a failed build.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
from dataclasses import dataclass, field

from edgevm.shared.clock import now
from edgevm.shared.netns import call_in_netns, write_sysctl
from edgevm.shared.netstate import NicRecord, PortMapping, VmNetRecord, VrfRecord

EXT_IP, NODE_IP = "172.31.255.1", "172.31.255.2"
VM_IP = "10.0.0.5"
GATEWAY = "10.0.0.1"
VM_TCP_PORT, VM_UDP_PORT = 80, 53
# host ports on n0, per VRF ("default" is the node namespace itself, its VM "d")
HOST_PORTS = {"a": (8080, 8053), "b": (9080, 9053), "default": (7080, 7053)}
UPLINKS = {"a": ("10.255.1.0", "10.255.1.1"), "b": ("10.255.2.0", "10.255.2.1")}


def sh(*argv: str, stdin: str | None = None) -> None:
    done = subprocess.run(argv, input=stdin, text=True, check=False, capture_output=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


def in_ns(ns: str, *argv: str, stdin: str | None = None) -> None:
    sh("ip", "netns", "exec", ns, *argv, stdin=stdin)


@dataclass
class Node:
    """The namespaces of one test node and the records netplumb would have written for it."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: list[str] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"edgevm-t-{self.tag}-{role}"

    @property
    def node(self) -> str:
        return self.ns("node")

    @property
    def ext(self) -> str:
        return self.ns("ext")

    def vrf(self, name: str) -> str:
        return self.ns(f"vrf{name}")

    def vm(self, name: str) -> str:
        return self.ns(f"vm{name}")

    def vm_name(self, name: str) -> str:
        return f"vm-{name}-{self.tag}"

    def _add(self, role: str) -> str:
        name = self.ns(role)
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def build(self) -> Node:
        try:
            self._build()
        except BaseException:
            self.remove()
            raise
        return self

    def _build(self) -> None:
        node, ext = self._add("node"), self._add("ext")
        write_sysctl(node, "net.ipv4.ip_forward", "1")
        sh("ip", "link", "add", "fw-e0", "netns", ext, "type", "veth", "peer", "name", "n0", "netns", node)
        sh("ip", "-n", ext, "link", "set", "fw-e0", "name", "e0")
        sh("ip", "-n", ext, "addr", "add", f"{EXT_IP}/30", "dev", "e0")
        sh("ip", "-n", node, "addr", "add", f"{NODE_IP}/30", "dev", "n0")
        sh("ip", "-n", ext, "link", "set", "e0", "up")
        sh("ip", "-n", node, "link", "set", "n0", "up")
        dnats = []
        for name, (node_side, vrf_side) in UPLINKS.items():
            vrf, vm = self._add(f"vrf{name}"), self._add(f"vm{name}")
            write_sysctl(vrf, "net.ipv4.ip_forward", "1")
            sh("ip", "link", "add", "fw-up", "netns", node, "type", "veth", "peer", "name", "uplink", "netns", vrf)
            sh("ip", "-n", node, "link", "set", "fw-up", "name", f"up-{name}")
            sh("ip", "-n", node, "addr", "add", f"{node_side}/31", "dev", f"up-{name}")
            sh("ip", "-n", vrf, "addr", "add", f"{vrf_side}/31", "dev", "uplink")
            sh("ip", "-n", node, "link", "set", f"up-{name}", "up")
            sh("ip", "-n", vrf, "link", "set", "uplink", "up")
            sh("ip", "-n", vrf, "route", "add", "default", "via", node_side)
            sh("ip", "link", "add", "fw-br", "netns", vrf, "type", "veth", "peer", "name", "eth0", "netns", vm)
            sh("ip", "-n", vrf, "link", "set", "fw-br", "name", "vmnet")
            sh("ip", "-n", vrf, "addr", "add", f"{GATEWAY}/24", "dev", "vmnet")
            sh("ip", "-n", vm, "addr", "add", f"{VM_IP}/24", "dev", "eth0")
            sh("ip", "-n", vrf, "link", "set", "vmnet", "up")
            sh("ip", "-n", vm, "link", "set", "eth0", "up")
            sh("ip", "-n", vm, "route", "add", "default", "via", GATEWAY)
            tcp, udp = HOST_PORTS[name]
            dnats += [
                f'iifname "n0" tcp dport {tcp} dnat ip to {vrf_side}',
                f'iifname "n0" udp dport {udp} dnat ip to {vrf_side}',
            ]
            in_ns(vrf, "nft", "-f", "-", stdin=f"""
table inet edgevm {{
    chain prerouting {{ type nat hook prerouting priority -100;
        iifname "uplink" tcp dport {tcp} dnat ip to {VM_IP}:{VM_TCP_PORT}
        iifname "uplink" udp dport {udp} dnat ip to {VM_IP}:{VM_UDP_PORT}
    }}
    chain postrouting {{ type nat hook postrouting priority 100; oifname "uplink" masquerade; }}
}}
""")
            # UDP entries end soon, so the tests see them completed (the kernel reaps them on a dump)
            write_sysctl(vrf, "net.netfilter.nf_conntrack_udp_timeout", "2")
            write_sysctl(vrf, "net.netfilter.nf_conntrack_udp_timeout_stream", "2")
        vm = self._add("vmd")
        sh("ip", "link", "add", "fw-vd", "netns", node, "type", "veth", "peer", "name", "eth0", "netns", vm)
        sh("ip", "-n", node, "link", "set", "fw-vd", "name", "vd")
        sh("ip", "-n", node, "addr", "add", f"{GATEWAY}/24", "dev", "vd")
        sh("ip", "-n", vm, "addr", "add", f"{VM_IP}/24", "dev", "eth0")
        sh("ip", "-n", node, "link", "set", "vd", "up")
        sh("ip", "-n", vm, "link", "set", "eth0", "up")
        sh("ip", "-n", vm, "route", "add", "default", "via", GATEWAY)
        tcp, udp = HOST_PORTS["default"]
        dnats += [
            f'iifname "n0" tcp dport {tcp} dnat ip to {VM_IP}:{VM_TCP_PORT}',
            f'iifname "n0" udp dport {udp} dnat ip to {VM_IP}:{VM_UDP_PORT}',
        ]
        in_ns(node, "nft", "-f", "-", stdin=f"""
table inet edgevm {{
    chain prerouting {{ type nat hook prerouting priority -100; {"; ".join(dnats)}; }}
    chain postrouting {{ type nat hook postrouting priority 100; oifname "n0" masquerade; }}
}}
""")

    def remove(self) -> None:
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)
        self.namespaces.clear()

    # -- netplumb's records ---------------------------------------------------------------------------
    def vrf_record(self, name: str) -> VrfRecord:
        node_side, _ = UPLINKS[name]
        return VrfRecord(
            name=name, subnet="10.0.0.0/24", gateway=GATEWAY, netns=self.vrf(name), uplink=f"{node_side}/31",
            created_at=now(),
        )

    def vm_record(self, name: str) -> VmNetRecord:
        """The record of VM a or b (in their VRFs), or d (in the default VRF: netns None)."""
        tcp, udp = HOST_PORTS["default" if name == "d" else name]
        return VmNetRecord(
            vm=self.vm_name(name),
            vrf="default" if name == "d" else name,
            netns=None if name == "d" else self.vrf(name),
            nics=[
                NicRecord(index=0, mac="52:54:00:00:00:05", address=f"{VM_IP}/24", gateway=GATEWAY,
                          bridge="vd" if name == "d" else "vmnet", tap="eth0")
            ],
            port_mappings=[
                PortMapping(host_interface="n0", host_port=tcp, vm_port=VM_TCP_PORT, protocol="tcp"),
                PortMapping(host_interface="n0", host_port=udp, vm_port=VM_UDP_PORT, protocol="udp"),
            ],
            active=True,
            updated_at=now(),
        )


def ns_socket(ns: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket living in namespace ns."""
    sock = call_in_netns(ns, lambda: socket.socket(socket.AF_INET, kind))
    sock.settimeout(5)
    return sock
