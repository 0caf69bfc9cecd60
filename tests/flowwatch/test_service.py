"""Flowwatch as a service, over NATS, on a node of real namespaces with real traffic (see topology.py).

One node (two VRFs, one VM each, both VMs at 10.0.0.5) and one flowwatch for the module; each test makes
its own connections, on ports of its own, and looks for its own flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY

from edgevm.cli.natsserver import NatsServer
from edgevm.flowwatch.app import make_setup
from edgevm.shared import bus, subjects
from edgevm.shared.client import Client
from edgevm.shared.config import Config
from edgevm.shared.errors import RemoteError
from edgevm.shared.netstate import vm_key, vrf_key
from edgevm.shared.objects import Flow
from edgevm.shared.runtime import serve

from ..helpers import EventCollector, eventually
from .topology import EXT_IP, HOST_PORTS, NODE_IP, UPLINKS, VM_IP, VM_TCP_PORT, VM_UDP_PORT, Node, ns_socket

pytestmark = pytest.mark.root

_ports = itertools.count(7001)


class Flowwatch:
    """A flowwatch serving a test node in this process; restartable."""

    def __init__(self, url: str, node: str, node_netns: str, state: Path) -> None:
        self.config = Config(node, url, state, "test:///default", "127.0.0.1", 0, 0, "INFO")
        self.node_netns = node_netns
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, client: Client) -> None:
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(serve("flowwatch", make_setup(self.node_netns), self.config, self._stop))

        async def serving() -> bool:
            with contextlib.suppress(RemoteError):
                await client.call("flow.list", {"vm": "nobody"})
            return True

        await eventually(serving, 20, "flow.list served")

    async def stop(self) -> None:
        assert self._stop is not None and self._task is not None
        self._stop.set()
        await asyncio.wait_for(self._task, 20)


@pytest.fixture(scope="module")
def topo() -> Iterator[Node]:
    node = Node().build()
    try:
        yield node
    finally:
        node.remove()


@pytest.fixture(scope="module")
async def fw(
    topo: Node, nats_server: NatsServer, nc: NATS, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Flowwatch]:
    js = nc.jetstream()
    buckets = await bus.ensure_jetstream(js)
    kv = buckets[bus.NET.name]
    node = f"t{topo.tag}"
    for name in UPLINKS:
        await kv.put(vrf_key(node, name), msgspec.json.encode(topo.vrf_record(name)))
        await kv.put(vm_key(node, topo.vm_name(name)), msgspec.json.encode(topo.vm_record(name)))
    await kv.put(vm_key(node, topo.vm_name("d")), msgspec.json.encode(topo.vm_record("d")))
    service = Flowwatch(nats_server.url, node, topo.node, tmp_path_factory.mktemp("fw"))
    await service.start(Client(nc, node))
    yield service
    await service.stop()


@pytest.fixture
def client(nc: NATS, fw: Flowwatch) -> Client:
    return Client(nc, fw.config.node)


async def flows(client: Client, vm: str, status: str = "all") -> list[Flow]:
    reply = await client.call("flow.list", {"vm": vm, "status": status, "limit": 500})
    return msgspec.convert(reply["flows"], list[Flow])


async def wait_flow(client: Client, vm: str, status: str, match, timeout: float = 5.0) -> Flow:
    async def found() -> Flow | None:
        return next((f for f in await flows(client, vm, status) if match(f)), None)

    return await eventually(found, timeout, f"a {status} flow of {vm}")


def listener(ns: str, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    sock = ns_socket(ns, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


class Connection:
    """A TCP connection from namespace `src` to `host:port`, accepted by `server` (a listener)."""

    def __init__(self, src: str, host: str, port: int, server: socket.socket) -> None:
        self.client = ns_socket(src)
        self.client.connect((host, port))
        self.peer, _ = server.accept()
        self.peer.settimeout(5)
        self.client_port: int = self.client.getsockname()[1]

    def exchange(self, up: int, down: int) -> None:
        self.client.sendall(b"u" * up)
        got = 0
        while got < up:
            got += len(self.peer.recv(65536))
        self.peer.sendall(b"d" * down)
        got = 0
        while got < down:
            got += len(self.client.recv(65536))

    def close(self) -> None:
        self.client.close()
        self.peer.close()


@pytest.fixture
def vm_listener(topo: Node) -> Iterator[socket.socket]:
    sock = listener(topo.vm("a"), VM_TCP_PORT)
    yield sock
    sock.close()


async def test_inbound_tcp_through_a_port_mapping_is_active_then_completed_with_its_bytes(
    topo: Node, client: Client, vm_listener: socket.socket
) -> None:
    vm = topo.vm_name("a")
    conn = Connection(topo.ext, NODE_IP, HOST_PORTS["a"][0], vm_listener)
    try:
        conn.exchange(5000, 700)
        started = time.monotonic()
        active = await wait_flow(client, vm, "active", lambda f: f.src_port == conn.client_port, 1.0)
        assert time.monotonic() - started < 1.0
        assert (active.protocol, active.direction, active.status) == ("tcp", "inbound", "active")
        assert (active.src_ip, active.dst_ip, active.dst_port) == (EXT_IP, VM_IP, VM_TCP_PORT)
        assert active.state == "ESTABLISHED" and active.node == client.node and active.vm == vm
        # the gauge counts on the event loop, also for a scrape from the metrics server's thread
        scraped = await asyncio.to_thread(REGISTRY.get_sample_value, "edgevm_flowwatch_active_flows", {"vm": vm})
        assert (scraped or 0) >= 1
        # An active flow's counters are read live from the kernel when listed, not left at the last dump.
        conn.exchange(5000, 700)
        [live] = [f for f in await flows(client, vm, "active") if f.id == active.id]
        assert live.bytes_in > 10000 and live.bytes_out > 1400 and live.packets_in >= 4
    finally:
        conn.close()
    done = await wait_flow(client, vm, "completed", lambda f: f.id == active.id)
    assert done.status == "completed" and done.ended_at is not None and done.started_at == active.started_at
    assert done.bytes_in > 10000 and 1400 < done.bytes_out < 10000
    assert done.packets_in >= 3 and done.packets_out >= 3
    assert [f.id for f in await flows(client, vm, "active") if f.id == active.id] == []
    label = {"netns": topo.vrf("a")}
    for metric, labels in [
        ("edgevm_flowwatch_flows_total", {"vm": vm, "event": "opened"}),
        ("edgevm_flowwatch_flows_total", {"vm": vm, "event": "closed"}),
        ("edgevm_flowwatch_conntrack_events_total", label),
        ("edgevm_flowwatch_resyncs_total", {**label, "reason": "start"}),
        ("edgevm_flowwatch_dump_duration_seconds_count", label),
    ]:
        assert (REGISTRY.get_sample_value(metric, labels) or 0) >= 1, metric
    # the node namespace saw the same connection (to the VRF's uplink): it is counted once, here
    assert [f.id for f in await flows(client, vm) if f.src_port == conn.client_port] == [active.id]


async def test_outbound_tcp_from_a_vm_is_attributed_to_it(topo: Node, client: Client) -> None:
    vm = topo.vm_name("a")
    port = next(_ports)
    server = listener(topo.ext, port)
    try:
        conn = Connection(topo.vm("a"), EXT_IP, port, server)
        try:
            conn.exchange(100, 3000)
            active = await wait_flow(client, vm, "active", lambda f: f.dst_port == port, 1.0)
            assert (active.direction, active.src_ip, active.src_port, active.dst_ip) == (
                "outbound", VM_IP, conn.client_port, EXT_IP
            )
        finally:
            conn.close()
    finally:
        server.close()
    done = await wait_flow(client, vm, "completed", lambda f: f.id == active.id)
    assert done.bytes_in > 3000 and 100 < done.bytes_out < 3000


async def test_udp_in_through_a_port_mapping_and_out_are_attributed_and_complete(topo: Node, client: Client) -> None:
    vm = topo.vm_name("a")
    port = next(_ports)
    in_server = listener(topo.vm("a"), VM_UDP_PORT, socket.SOCK_DGRAM)
    out_server = listener(topo.ext, port, socket.SOCK_DGRAM)
    in_client = ns_socket(topo.ext, socket.SOCK_DGRAM)
    out_client = ns_socket(topo.vm("a"), socket.SOCK_DGRAM)
    try:
        for sock, server, target in (
            (in_client, in_server, (NODE_IP, HOST_PORTS["a"][1])),
            (out_client, out_server, (EXT_IP, port)),
        ):
            sock.sendto(b"q" * 100, target)
            _, peer = server.recvfrom(2048)
            server.sendto(b"r" * 400, peer)
            sock.recv(2048)
        inbound = await wait_flow(
            client, vm, "active", lambda f: f.protocol == "udp" and f.src_port == in_client.getsockname()[1], 1.0
        )
        outbound = await wait_flow(client, vm, "active", lambda f: f.protocol == "udp" and f.dst_port == port, 1.0)
    finally:
        for sock in (in_server, out_server, in_client, out_client):
            sock.close()
    assert (inbound.direction, inbound.src_ip, inbound.dst_ip, inbound.dst_port) == (
        "inbound", EXT_IP, VM_IP, VM_UDP_PORT
    )
    assert (outbound.direction, outbound.src_ip, outbound.dst_ip) == ("outbound", VM_IP, EXT_IP)
    # UDP entries end by timeout (2 s in these VRFs); a dump makes the kernel reap expired ones at once
    await asyncio.sleep(2.5)
    await asyncio.to_thread(
        subprocess.run, ["ip", "netns", "exec", topo.vrf("a"), "conntrack", "-L"], capture_output=True, check=False
    )
    done_in = await wait_flow(client, vm, "completed", lambda f: f.id == inbound.id)
    done_out = await wait_flow(client, vm, "completed", lambda f: f.id == outbound.id)
    assert (done_in.bytes_in, done_in.bytes_out) == (128, 428)  # payload + 28 bytes of IP and UDP headers
    assert (done_out.bytes_out, done_out.bytes_in) == (128, 428)


async def test_terminate_resets_the_client_and_a_new_connection_works(
    topo: Node, client: Client, nc: NATS, vm_listener: socket.socket
) -> None:
    vm = topo.vm_name("a")
    events = await EventCollector().start(nc, subjects.event(client.node, f"flow.{vm}"))
    await nc.flush()
    conn = Connection(topo.ext, NODE_IP, HOST_PORTS["a"][0], vm_listener)
    try:
        conn.exchange(10, 10)
        active = await wait_flow(client, vm, "active", lambda f: f.src_port == conn.client_port, 1.0)
        cut = msgspec.convert(await client.call("flow.terminate", {"vm": vm, "id": active.id}), Flow)
        cut_at = time.monotonic()
        assert (cut.id, cut.status) == (active.id, "terminated") and cut.ended_at is not None
        assert cut.bytes_in > 10 and cut.bytes_out > 10

        def reset_seen(sock: socket.socket) -> float:
            """How long an idle end, only waiting to read, takes to learn of the cut."""
            sock.settimeout(1.0)
            with pytest.raises(ConnectionResetError):
                sock.recv(10)
            return time.monotonic() - cut_at

        assert await asyncio.to_thread(reset_seen, conn.client) < 1.0  # the client, on the host's side
        assert await asyncio.to_thread(reset_seen, conn.peer) < 1.0  # the VM's side
    finally:
        conn.close()
    listed = [f for f in await flows(client, vm, "completed") if f.id == active.id]
    assert [f.status for f in listed] == ["terminated"]
    assert [f.id for f in await flows(client, vm, "active") if f.id == active.id] == []

    again = Connection(topo.ext, NODE_IP, HOST_PORTS["a"][0], vm_listener)
    try:
        await asyncio.to_thread(again.exchange, 100, 100)
        await wait_flow(client, vm, "active", lambda f: f.src_port == again.client_port, 1.0)
    finally:
        again.close()
    await eventually(lambda: _async(any(e.flow.id == active.id for e in events.of_type("flow.terminated"))))
    assert any(e.flow.id == active.id for e in events.of_type("flow.opened"))
    await events.stop()


@pytest.mark.parametrize("direction", ["outbound from VRF a", "inbound to the default VRF"])
async def test_terminate_resets_both_ends_through_masquerade_and_in_the_node_namespace(
    topo: Node, client: Client, direction: str
) -> None:
    if direction.startswith("outbound"):
        vm, port = topo.vm_name("a"), next(_ports)
        server = listener(topo.ext, port)
        conn = Connection(topo.vm("a"), EXT_IP, port, server)
        mine = lambda f: f.dst_port == port  # noqa: E731
    else:
        vm = topo.vm_name("d")
        server = listener(topo.vm("d"), VM_TCP_PORT)
        conn = Connection(topo.ext, NODE_IP, HOST_PORTS["default"][0], server)
        mine = lambda f: f.src_port == conn.client_port  # noqa: E731
    try:
        conn.exchange(10, 10)
        active = await wait_flow(client, vm, "active", mine, 1.0)
        await client.call("flow.terminate", {"vm": vm, "id": active.id})
        cut_at = time.monotonic()

        def reset_seen(sock: socket.socket) -> float:
            sock.settimeout(1.0)
            with pytest.raises(ConnectionResetError):
                sock.recv(10)
            return time.monotonic() - cut_at

        assert await asyncio.to_thread(reset_seen, conn.client) < 1.0
        assert await asyncio.to_thread(reset_seen, conn.peer) < 1.0
    finally:
        conn.close()
        server.close()


async def test_terminate_drops_a_udp_flow_for_the_cut_and_records_it(topo: Node, client: Client) -> None:
    vm = topo.vm_name("a")
    server = listener(topo.vm("a"), VM_UDP_PORT, socket.SOCK_DGRAM)
    sender = ns_socket(topo.ext, socket.SOCK_DGRAM)
    target = (NODE_IP, HOST_PORTS["a"][1])
    try:
        sender.sendto(b"one", target)
        assert server.recvfrom(64)[0] == b"one"
        sport = sender.getsockname()[1]
        active = await wait_flow(client, vm, "active", lambda f: f.protocol == "udp" and f.src_port == sport, 1.0)
        cut = await client.call("flow.terminate", {"vm": vm, "id": active.id})
        assert (cut["status"], cut["bytes_in"]) == ("terminated", 31)
        sender.sendto(b"two", target)
        server.settimeout(0.5)
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(server.recvfrom, 64)
        assert [f.status for f in await flows(client, vm, "completed") if f.id == active.id] == ["terminated"]
    finally:
        sender.close()
        server.close()


async def _async(value: object) -> object:
    return value


async def test_flows_of_a_vm_never_show_on_the_vm_with_the_same_address_in_another_vrf(
    topo: Node, client: Client, vm_listener: socket.socket
) -> None:
    b_listener = listener(topo.vm("b"), VM_TCP_PORT)
    conns = {}
    try:
        conns["a"] = Connection(topo.ext, NODE_IP, HOST_PORTS["a"][0], vm_listener)
        conns["b"] = Connection(topo.ext, NODE_IP, HOST_PORTS["b"][0], b_listener)
        for name, other in (("a", "b"), ("b", "a")):
            port = conns[name].client_port
            mine = await wait_flow(client, topo.vm_name(name), "active", lambda f, p=port: f.src_port == p, 1.0)
            assert (mine.dst_ip, mine.dst_port, mine.direction) == (VM_IP, VM_TCP_PORT, "inbound")
            theirs = await flows(client, topo.vm_name(other))
            assert all(f.src_port != port and f.id != mine.id for f in theirs)
    finally:
        for conn in conns.values():
            conn.close()
        b_listener.close()


async def test_a_vm_of_the_default_vrf_is_seen_in_the_node_namespace_and_only_there(
    topo: Node, client: Client, vm_listener: socket.socket
) -> None:
    d_listener = listener(topo.vm("d"), VM_TCP_PORT)
    conns = {}
    try:
        conns["d"] = Connection(topo.ext, NODE_IP, HOST_PORTS["default"][0], d_listener)
        conns["a"] = Connection(topo.ext, NODE_IP, HOST_PORTS["a"][0], vm_listener)  # passes the node too
        for conn in conns.values():
            conn.exchange(10, 10)
        port = conns["d"].client_port
        mine = await wait_flow(client, topo.vm_name("d"), "active", lambda f: f.src_port == port, 1.0)
        assert (mine.direction, mine.src_ip, mine.dst_ip, mine.dst_port) == ("inbound", EXT_IP, VM_IP, VM_TCP_PORT)
        await wait_flow(client, topo.vm_name("a"), "active", lambda f: f.src_port == conns["a"].client_port, 1.0)
        seen_by_d = {f.src_port for f in await flows(client, topo.vm_name("d"))}
        assert conns["a"].client_port not in seen_by_d  # VM a's port mapping crosses the node: not d's
        for other in ("a", "b"):
            assert port not in {f.src_port for f in await flows(client, topo.vm_name(other))}
    finally:
        for conn in conns.values():
            conn.close()
        d_listener.close()


async def test_the_address_map_follows_netplumbs_records_live(topo: Node, client: Client, nc: NATS) -> None:
    kv = await nc.jetstream().key_value(bus.NET.name)
    vm, key = topo.vm_name("b"), vm_key(client.node, topo.vm_name("b"))
    b_listener = listener(topo.vm("b"), VM_TCP_PORT)
    conn = None
    try:
        await kv.delete(key)
        async def forgotten() -> bool:
            try:
                await client.call("flow.list", {"vm": vm, "status": "active"})
            except RemoteError as exc:
                return exc.code == "404"
            return False

        await eventually(forgotten, 5, "VM b forgotten")
        conn = Connection(topo.ext, NODE_IP, HOST_PORTS["b"][0], b_listener)
        conn.exchange(10, 10)
        # netplumb records the VM again: the connection already there is found by the resync that follows
        await kv.put(key, msgspec.json.encode(topo.vm_record("b")))
        found = await wait_flow(client, vm, "active", lambda f: f.src_port == conn.client_port, 2.0)
        assert (found.direction, found.dst_ip) == ("inbound", VM_IP)
    finally:
        if conn is not None:
            conn.close()
        b_listener.close()
        await kv.put(key, msgspec.json.encode(topo.vm_record("b")))


@pytest.mark.parametrize(
    ("verb", "body", "code", "field"),
    [
        ("flow.list", {"vm": "no-such-vm"}, "404", "vm"),
        ("flow.list", {"vm": "VM_A", "status": "open"}, "400", "status"),
        ("flow.list", {"vm": "VM_A", "limit": 0}, "400", "limit"),
        ("flow.terminate", {"vm": "no-such-vm", "id": "x"}, "404", "vm"),
        ("flow.terminate", {"vm": "VM_A", "id": "no-such-flow"}, "404", "id"),
        ("flow.terminate", {"vm": "VM_A"}, "400", "id"),
    ],
)
async def test_bad_requests_are_refused_with_their_code_and_change_nothing(
    topo: Node, client: Client, verb: str, body: dict, code: str, field: str
) -> None:
    body = {k: topo.vm_name("a") if v == "VM_A" else v for k, v in body.items()}
    # one live connection to each VM: their flows, kernel entries and (empty) cuts are what must not change
    listeners = {name: listener(topo.vm(name), VM_TCP_PORT) for name in ("b", "d")}
    conns: dict[str, Connection] = {}
    try:
        listeners["a"] = listener(topo.vm("a"), VM_TCP_PORT)
        for name in ("a", "b", "d"):
            conns[name] = Connection(topo.ext, NODE_IP, HOST_PORTS["default" if name == "d" else name][0],
                                     listeners[name])
            conns[name].exchange(10, 10)
        ports = {conn.client_port for conn in conns.values()}

        async def state() -> tuple[set[tuple[str, str]], set[int], set[int]]:
            active = set()
            for name in ("a", "b", "d"):
                vm = topo.vm_name(name)
                active |= {(vm, f.id) for f in await flows(client, vm, "active") if f.src_port in ports}
            tracked = set()
            for ns in (topo.node, topo.vrf("a"), topo.vrf("b")):
                listed = await asyncio.to_thread(_conntrack, ns)
                tracked |= {p for p in ports if f"sport={p} " in listed}
            listed = "".join([await asyncio.to_thread(_cut_set, ns) for ns in (topo.node, topo.vrf("a"), topo.vrf("b"))])
            cut = {p for p in ports if f". {p} " in listed}
            return active, tracked, cut

        before = await eventually(lambda: _full(state(), 3), 5, "a flow of each connection")
        with pytest.raises(RemoteError) as caught:
            await client.call(verb, body)
        assert (caught.value.code, caught.value.field) == (code, field)
        if field == "status":
            assert "status" in caught.value.message and "'active'" in caught.value.message
        after = await state()
        assert after == before and after[2] == set()  # the same flows and entries; none of them cut
        for conn in conns.values():
            await asyncio.to_thread(conn.exchange, 10, 10)  # every connection still works
    finally:
        for conn in conns.values():
            conn.close()
        for sock in listeners.values():
            sock.close()


async def _full(
    state: Awaitable[tuple[set[tuple[str, str]], set[int], set[int]]], size: int
) -> tuple[set[tuple[str, str]], set[int], set[int]] | None:
    got = await state
    return got if len(got[0]) == size and len(got[1]) == size else None


def _conntrack(ns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "conntrack", "-L"], capture_output=True, text=True).stdout


def _cut_set(ns: str) -> str:
    listed = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "list", "set", "inet", "edgevm_flows", "cut4"], capture_output=True, text=True
    )
    return listed.stdout


def _tables(ns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "tables"], capture_output=True, text=True).stdout


async def test_terminating_a_flow_that_ended_is_a_conflict(
    topo: Node, client: Client, vm_listener: socket.socket
) -> None:
    vm = topo.vm_name("a")
    conn = Connection(topo.ext, NODE_IP, HOST_PORTS["a"][0], vm_listener)
    conn.exchange(10, 10)
    active = await wait_flow(client, vm, "active", lambda f: f.src_port == conn.client_port, 1.0)
    conn.close()
    await wait_flow(client, vm, "completed", lambda f: f.id == active.id)
    with pytest.raises(RemoteError) as caught:
        await client.call("flow.terminate", {"vm": vm, "id": active.id})
    assert (caught.value.code, caught.value.field) == ("409", "id")
    [after] = [f for f in await flows(client, vm, "completed") if f.id == active.id]
    assert after.status == "completed"


async def test_a_restart_keeps_history_and_rebuilds_the_active_flows_from_the_kernel(
    topo: Node, client: Client, fw: Flowwatch, vm_listener: socket.socket
) -> None:
    vm = topo.vm_name("a")
    done_conn = Connection(topo.ext, NODE_IP, HOST_PORTS["a"][0], vm_listener)
    done_conn.exchange(10, 10)
    done = await wait_flow(client, vm, "active", lambda f: f.src_port == done_conn.client_port, 1.0)
    done_conn.close()
    await wait_flow(client, vm, "completed", lambda f: f.id == done.id)
    live = Connection(topo.ext, NODE_IP, HOST_PORTS["a"][0], vm_listener)
    # two flows that end while flowwatch is down: a TCP connection closed (its entry lingers in TIME_WAIT)
    # and a UDP one whose entry expires and goes
    closed = Connection(topo.ext, NODE_IP, HOST_PORTS["a"][0], vm_listener)
    udp_server = listener(topo.vm("a"), VM_UDP_PORT, socket.SOCK_DGRAM)
    udp_client = ns_socket(topo.ext, socket.SOCK_DGRAM)
    try:
        live.exchange(2000, 10)
        closed.exchange(300, 10)
        udp_client.sendto(b"q" * 100, (NODE_IP, HOST_PORTS["a"][1]))
        udp_server.recvfrom(2048)
        udp_port = udp_client.getsockname()[1]
        before = await wait_flow(client, vm, "active", lambda f: f.src_port == live.client_port, 1.0)
        closing = await wait_flow(client, vm, "active", lambda f: f.src_port == closed.client_port, 1.0)
        expiring = await wait_flow(client, vm, "active", lambda f: f.src_port == udp_port, 1.0)
        await fw.stop()
        stopped_at = time.time()
        closed.close()
        await asyncio.sleep(2.5)  # UDP entries of the VRFs time out after 2 s; a listing reaps them
        await asyncio.to_thread(_conntrack, topo.vrf("a"))
        await fw.start(client)
        rebuilt = await wait_flow(client, vm, "active", lambda f: f.src_port == live.client_port, 1.0)
        assert (rebuilt.id, rebuilt.started_at) == (before.id, before.started_at)
        assert rebuilt.bytes_in > 2000  # the whole connection's counters, the kernel's, not since the restart
        assert [f.status for f in await flows(client, vm, "completed") if f.id == done.id] == ["completed"]
        # the flows that ended meanwhile are recorded completed, once, no later than the restart
        for ended in (closing, expiring):
            record = await wait_flow(client, vm, "completed", lambda f, i=ended.id: f.id == i, 10.0)
            assert record.status == "completed" and record.started_at == ended.started_at
            assert record.ended_at is not None and record.ended_at >= _rfc3339(stopped_at)
        done_closing = next(f for f in await flows(client, vm, "completed") if f.id == closing.id)
        assert done_closing.bytes_in > 300  # read from its lingering entry
        assert [f.id for f in await flows(client, vm, "all")].count(closing.id) == 1
    finally:
        live.close()
        closed.close()
        udp_client.close()
        udp_server.close()
    await wait_flow(client, vm, "completed", lambda f: f.src_port == live.client_port)


def _rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


async def test_a_namespace_that_leaves_the_records_ends_its_flows_and_loses_our_table(
    topo: Node, client: Client, nc: NATS
) -> None:
    kv = await nc.jetstream().key_value(bus.NET.name)
    vm = topo.vm_name("b")
    b_listener = listener(topo.vm("b"), VM_TCP_PORT)
    conn = Connection(topo.ext, NODE_IP, HOST_PORTS["b"][0], b_listener)
    try:
        conn.exchange(4000, 10)
        active = await wait_flow(client, vm, "active", lambda f: f.src_port == conn.client_port, 1.0)
        assert "edgevm_flows" in await asyncio.to_thread(_tables, topo.vrf("b"))
        await kv.delete(vm_key(client.node, vm))
        await kv.delete(vrf_key(client.node, "b"))  # nothing names VRF b's namespace any more
        done = await wait_flow(client, vm, "completed", lambda f: f.id == active.id)
        assert done.status == "completed" and done.bytes_in > 4000  # its final counters, read from the kernel
        await eventually(lambda: _async("edgevm_flows" not in _tables(topo.vrf("b"))), 5, "our table removed")
    finally:
        conn.close()
        b_listener.close()
        await kv.put(vrf_key(client.node, "b"), msgspec.json.encode(topo.vrf_record("b")))
        await kv.put(vm_key(client.node, vm), msgspec.json.encode(topo.vm_record("b")))
    await eventually(lambda: _async("edgevm_flows" in _tables(topo.vrf("b"))), 10, "VRF b watched again")
