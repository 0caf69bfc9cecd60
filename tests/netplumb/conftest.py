"""A lab of throw-away network namespaces for netplumb's kernel tests, and real traffic through them.

Every namespace a test creates (nodes, LAN hosts, VMs, and the VRF namespaces the drivers create)
is named `edgevm-t-<random>-...` and removed afterwards; nothing touches the host's own namespace.
"""

import asyncio
import json
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from pyroute2 import netns as pyroute2_netns
from tests.helpers import ServiceProcess

from edgevm.cli.natsserver import NatsServer
from edgevm.netplumb import ipam
from edgevm.netplumb.app import make_setup
from edgevm.netplumb.drivers import netns as ns
from edgevm.netplumb.drivers import nft
from edgevm.netplumb.drivers.links import open_links
from edgevm.netplumb.drivers.values import PortMappingRule, VirtualIpRule, VrfPlan, plan_vrf
from edgevm.netplumb.drivers.vrf import attach_port, ensure_vrf
from edgevm.netplumb.names import VRF_LINK, VRF_UPLINK, vm_tap
from edgevm.netplumb.rulesets import tables
from edgevm.netplumb.settings import Settings
from edgevm.shared.client import Client
from edgevm.shared.config import Config
from edgevm.shared.errors import RemoteError
from edgevm.shared.runtime import serve

REPLY_TIMEOUT = 1.5


def wait_up(netns: str, *ifnames: str, timeout: float = 5.0) -> None:
    """Waits until links have carrier: a fresh veth drops what it is given for up to a second."""
    deadline = time.monotonic() + timeout
    with open_links(netns) as links:
        for ifname in ifnames:
            while links.link(ifname).get("operstate") != "UP":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{ifname} in {netns} did not come up")
                time.sleep(0.02)
                links.refresh()


class Server:
    """A TCP or UDP server in a namespace answering `<ident> <peer address>` to every request."""

    def __init__(self, netns: str, kind: int, port: int, ident: str) -> None:
        self.ident = ident
        self.sock = pyroute2_netns.create_socket(netns, socket.AF_INET, kind, flags=0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", port))
        self.sock.settimeout(0.1)
        if kind == socket.SOCK_STREAM:
            self.sock.listen(16)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(kind,), daemon=True)
        self._thread.start()

    def _serve(self, kind: int) -> None:
        while not self._stop.is_set():
            try:
                if kind == socket.SOCK_DGRAM:
                    _, peer = self.sock.recvfrom(2048)
                    self.sock.sendto(f"{self.ident} {peer[0]}".encode(), peer)
                    continue
                conn, peer = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(REPLY_TIMEOUT)
                try:
                    conn.recv(2048)
                    conn.sendall(f"{self.ident} {peer[0]}".encode())
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


class Lab:
    """Namespaces, links and traffic helpers for one test; `cleanup` removes all it created."""

    def __init__(self) -> None:
        self.prefix = f"edgevm-t-{secrets.token_hex(3)}-"
        self._servers: list[Server] = []
        self._uplinks: list[IPv4Network] = []

    def netns(self, role: str) -> str:
        """A new empty namespace with loopback up."""
        name = f"{self.prefix}{role}"
        ns.ensure_netns(name)
        return name

    def vrf(self, node: str, name: str, subnet: str) -> VrfPlan:
        """A VRF plan for a lab node (its VRF namespaces are prefixed by the node's name)."""
        if name == "default":
            return plan_vrf(name, subnet)
        uplink = ipam.allocate_uplink(ipam.DEFAULT_UPLINK_POOL, self._uplinks)
        self._uplinks.append(uplink)
        return plan_vrf(name, subnet, uplink=uplink, netns_prefix=f"{node}-")

    def wire(self, node: str, role: str, node_if: str, address: str | None = None, gateway: str | None = None) -> str:
        """A namespace whose `eth0` is a veth to `node_if` in the node, with an address and route."""
        inner = self.netns(role)
        with open_links(node) as links:
            links.ensure_veth(node_if, "eth0", inner)
            links.ensure_up(node_if)
        with open_links(inner) as links:
            if address is not None:
                links.ensure_addresses("eth0", [IPv4Interface(address)])
            links.ensure_up("eth0")
            if gateway is not None:
                links.ensure_default_route(IPv4Address(gateway), "eth0")
        wait_up(node, node_if)
        wait_up(inner, "eth0")
        return inner

    def host(self, node: str, role: str, node_if: str, node_address: str, address: str) -> str:
        """A LAN host wired to the node; the node's side gets `node_address`."""
        inner = self.wire(node, role, node_if, address, gateway=str(IPv4Interface(node_address).ip))
        with open_links(node) as links:
            links.ensure_addresses(node_if, [IPv4Interface(node_address)])
        return inner

    def vm(self, node: str, vrf: VrfPlan, role: str, address: str) -> str:
        """A namespace standing for a VM: a veth named like its tap, on the VRF's host bridge."""
        tap = vm_tap(role, 0)
        inner = self.wire(node, role, tap, f"{address}/{vrf.subnet.prefixlen}", str(vrf.gateway))
        attach_port(vrf, tap, node)
        return inner

    def converge(
        self,
        node: str,
        vrfs: Iterable[VrfPlan],
        port_mappings: Iterable[PortMappingRule] = (),
        virtual_ips: Iterable[VirtualIpRule] = (),
    ) -> None:
        """Ensures every VRF and every namespace's edgevm table, as the service's reconcile would."""
        plans = list(vrfs)
        for vrf in plans:
            ensure_vrf(vrf, node)
            if not vrf.is_default:
                wait_up(vrf.netns, VRF_LINK, VRF_UPLINK)
        for netns, table in tables(plans, port_mappings, virtual_ips).items():
            nft.ensure_table(table, node if netns is None else netns)

    def serve(self, netns: str, port: int, ident: str, udp: bool = False) -> Server:
        """A TCP (or UDP) server in a namespace, stopped at cleanup."""
        server = Server(netns, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM, port, ident)
        self._servers.append(server)
        return server

    def tcp(self, netns: str, address: str, port: int) -> str | None:
        """The reply of a TCP server reached from `netns`, or None when it cannot be reached."""
        with pyroute2_netns.create_socket(netns, socket.AF_INET, socket.SOCK_STREAM, flags=0) as sock:
            sock.settimeout(REPLY_TIMEOUT)
            try:
                sock.connect((address, port))
                sock.sendall(b"hello")
                return sock.recv(2048).decode() or None
            except OSError:
                return None

    def udp(self, netns: str, address: str, port: int) -> str | None:
        """The reply of a UDP server reached from `netns`, or None when none comes."""
        with pyroute2_netns.create_socket(netns, socket.AF_INET, socket.SOCK_DGRAM, flags=0) as sock:
            sock.settimeout(REPLY_TIMEOUT)
            try:
                sock.sendto(b"hello", (address, port))
                return sock.recv(2048).decode()
            except OSError:
                return None

    def ping(self, netns: str, address: str) -> bool:
        """Whether one ICMP echo from `netns` to `address` is answered."""
        done = subprocess.run(
            ["ip", "netns", "exec", netns, "busybox", "ping", "-c", "1", "-W", "1", address],
            capture_output=True,
            timeout=10,
            check=False,
        )
        return done.returncode == 0

    def cleanup(self) -> None:
        """Stops servers and removes every namespace of this lab."""
        for server in self._servers:
            server.close()
        for name in sorted(os.listdir(ns.NETNS_DIR), reverse=True):
            if name.startswith(self.prefix):
                ns.remove_netns(name)


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh lab, removed after the test whatever its outcome."""
    created = Lab()
    try:
        yield created
    finally:
        created.cleanup()


@pytest.fixture
def node(lab: Lab) -> str:
    """A namespace standing for a whole node (the node's world)."""
    return lab.netns("node")


# --- The netplumb service, in this process or as its own process, driving a lab namespace as its node.


@dataclass
class NetNode:
    """A running netplumb service whose node world is a lab namespace."""

    node: str  # the node id
    netns: str  # the node's namespace
    client: Client
    stop: asyncio.Event | None = None
    task: asyncio.Task[None] | None = None
    process: ServiceProcess | None = None

    async def call(self, verb: str, request: Any = None) -> Any:
        """A command to this node; an error reply raises RemoteError."""
        return await self.client.call(verb, request)

    async def error(self, verb: str, request: Any = None) -> RemoteError:
        """The error reply of a command expected to fail."""
        with pytest.raises(RemoteError) as caught:
            await self.client.call(verb, request)
        return caught.value

    async def shutdown(self) -> None:
        """Stops the service (a second call does nothing)."""
        if self.task is not None and self.stop is not None:
            self.stop.set()
            await asyncio.wait_for(self.task, 30)
            self.task = None
        if self.process is not None:
            await asyncio.to_thread(self.process.stop)


def netplumb_settings(netns: str, subnet: str = "10.77.0.0/24", **overrides: Any) -> Settings:
    """Settings for a service driving lab namespace `netns`; its VRF namespaces are named after it."""
    return Settings(
        default_subnet=IPv4Network(subnet), netns_prefix=f"{netns}-", node_netns=netns, reconcile_interval=0,
        **overrides,
    )


async def wait_ready(client: Client, timeout: float = 20) -> None:
    """Waits until the node's netplumb answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.call("net.vrf.list")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def start_netplumb(nats_url: str, nc: NATS, netns: str, state: Path, node: str | None = None,
                         subnet: str = "10.77.0.0/24", **settings: Any) -> NetNode:
    """A netplumb service in this process, its node world the lab namespace `netns` (`settings` override)."""
    node = node or f"np-{secrets.token_hex(4)}"
    config = Config(node, nats_url, state, "test:///default", "127.0.0.1", 0, 0, "WARNING")
    stop = asyncio.Event()
    setup = make_setup(netplumb_settings(netns, subnet, **settings))
    task = asyncio.create_task(serve("netplumb", setup, config, stop))
    client = Client(nc, node, timeout=15)
    await wait_ready(client)
    return NetNode(node, netns, client, stop, task)


def start_netplumb_process(nats_url: str, nc: NATS, netns: str, log_path: Path, node: str,
                           subnet: str = "10.77.0.0/24") -> NetNode:
    """`python -m edgevm.netplumb` as its own process (started, not yet ready), driving `netns`."""
    env = {
        "EDGEVM_NODE": node,
        "EDGEVM_NATS_URL": nats_url,
        "EDGEVM_STATE_DIR": str(log_path.parent),
        "EDGEVM_NODE_NETNS": netns,
        "EDGEVM_NETNS_PREFIX": f"{netns}-",
        "EDGEVM_DEFAULT_SUBNET": subnet,
        "EDGEVM_NET_RECONCILE_INTERVAL": "0",
        "EDGEVM_LOG_LEVEL": "INFO",
    }
    process = ServiceProcess("netplumb", env, log_path).start()
    return NetNode(node, netns, Client(nc, node, timeout=15), process=process)


@pytest.fixture
async def netplumb(lab: Lab, node: str, nats_server: NatsServer, nc: NATS, tmp_path: Path) -> AsyncIterator[NetNode]:
    """A netplumb service in this process whose node is the lab's `node` namespace."""
    service = await start_netplumb(nats_server.url, nc, node, tmp_path)
    try:
        yield service
    finally:
        await service.shutdown()


def vm_nic(lab: Lab, node: str, vm: str, address: str, gateway: str, index: int = 0) -> str:
    """A namespace standing for a VM: its eth0 is a veth named like the VM's tap in the node namespace.

    Not put on any bridge: net.vm.activate does that, as libvirt would have.
    """
    return lab.wire(node, vm, vm_tap(vm, index), address, gateway)


def ruleset(netns: str) -> Any:
    """`nft -j list ruleset` of a namespace with counter values zeroed (traffic changes them, nothing else
    may); rule handles kept, so a table that was re-applied (even with the same rules) shows."""
    listing = json.loads(subprocess.run(["ip", "netns", "exec", netns, "nft", "-j", "list", "ruleset"],
                                        capture_output=True, text=True, check=True).stdout)

    def zero(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: ({"packets": 0, "bytes": 0} if k == "counter" and isinstance(v, dict) else zero(v))
                    for k, v in value.items()}
        if isinstance(value, list):
            return [zero(v) for v in value]
        return value

    return zero(listing)
