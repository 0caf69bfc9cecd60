"""Throw-away network namespaces where conntrack is hooked and accounting is on, and traffic inside them.

Each namespace is named `edgevm-t-<random>-ct` and removed after its test; nothing touches the host's own.
"""

from __future__ import annotations

import secrets
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgevm.flowwatch.drivers import ctsource
from edgevm.shared.netns import call_in_netns, write_sysctl
from tests.helpers import mark_needing_root

# conntrack only tracks in a namespace once a rule there uses it.
HOOK_RULES = """
table inet edgevm_t {
    chain out { type filter hook output priority 0; ct state new counter; }
}
"""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every flowwatch test needs root for namespaces, nftables and ctnetlink (tests/conftest.py checks it)."""
    mark_needing_root(items, Path(__file__).parent)


def make_netns(role: str = "ct") -> str:
    """A new namespace with loopback up, a conntrack-hooking rule, counters and timestamps on."""
    name = f"edgevm-t-{secrets.token_hex(3)}-{role}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "netns", "exec", name, "nft", "-f", "-"], input=HOOK_RULES, text=True, check=True)
        ctsource.enable_accounting(name)
        # a dump reaps expired entries at once, so a TIME_WAIT of 1 s gives a prompt DESTROY
        write_sysctl(name, "net.netfilter.nf_conntrack_tcp_timeout_time_wait", "1")
    except BaseException:
        remove_netns(name)
        raise
    return name


def remove_netns(name: str) -> None:
    """Remove a namespace made by make_netns."""
    subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh conntrack-hooked namespace, removed after the test."""
    name = make_netns()
    try:
        yield name
    finally:
        remove_netns(name)


def ns_socket(
    netns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM, proto: int = 0
) -> socket.socket:
    """A socket living in netns (a socket keeps the namespace it was made in)."""
    return call_in_netns(netns, lambda: socket.socket(family, kind, proto))


class TcpPair:
    """A TCP connection on loopback inside a namespace: client, accepted server side, and the listener."""

    def __init__(self, netns: str, family: int = socket.AF_INET) -> None:
        host = "127.0.0.1" if family == socket.AF_INET else "::1"
        self.listener = ns_socket(netns, family)
        self.listener.bind((host, 0))
        self.listener.listen()
        self.client = ns_socket(netns, family)
        self.client.settimeout(5)
        self.client.connect(self.listener.getsockname()[:2])
        self.server, _ = self.listener.accept()
        self.server.settimeout(5)

    @property
    def ports(self) -> tuple[int, int]:
        """(client port, server port)."""
        return self.client.getsockname()[1], self.listener.getsockname()[1]

    def exchange(self, up: int, down: int) -> None:
        """Send up bytes client to server and down bytes back, reading all of them."""
        self.client.sendall(b"u" * up)
        recv_exactly(self.server, up)
        self.server.sendall(b"d" * down)
        recv_exactly(self.client, down)

    def close(self) -> None:
        for sock in (self.client, self.server, self.listener):
            sock.close()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Exactly size bytes from a stream socket."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("peer closed early")
        data += chunk
    return data


def udp_exchange(netns: str, family: int = socket.AF_INET) -> tuple[int, int]:
    """One UDP datagram each way on loopback in netns; the (client port, server port)."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    with ns_socket(netns, family, socket.SOCK_DGRAM) as server, ns_socket(netns, family, socket.SOCK_DGRAM) as client:
        server.bind((host, 0))
        client.settimeout(5)
        client.sendto(b"ping", server.getsockname()[:2])
        _, peer = server.recvfrom(64)
        server.sendto(b"pong", peer)
        client.recv(64)
        return client.getsockname()[1], server.getsockname()[1]


def udp_burst(netns: str, count: int, first_port: int = 20000) -> None:
    """count new UDP flows (one datagram each, to successive ports of 127.0.0.1) in netns."""
    with ns_socket(netns, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for port in range(first_port, first_port + count):
            sock.sendto(b"x", ("127.0.0.1", port))


def ping(netns: str, family: int = socket.AF_INET, ident: int = 0x1234) -> None:
    """One ICMP (or ICMPv6) echo on loopback in netns, answered by the kernel."""
    if family == socket.AF_INET:
        sock = ns_socket(netns, family, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        header = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"ping"
        checksum = _inet_checksum(header)
        packet = header[:2] + struct.pack("!H", checksum) + header[4:]
        target = ("127.0.0.1", 0)
    else:
        sock = ns_socket(netns, family, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        packet = struct.pack("!BBHHH", 128, 0, 0, ident, 1) + b"ping"  # the kernel fills the checksum
        target = ("::1", 0)
    with sock:
        sock.settimeout(5)
        sock.sendto(packet, target)
        while True:  # the raw socket sees our request too
            reply = sock.recv(256)
            icmp = reply[20:] if family == socket.AF_INET else reply
            if icmp[0] in (0, 129):
                return


def _inet_checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF
