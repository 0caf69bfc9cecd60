"""ctsource in real namespaces with real traffic: dumps, event streams, deletion, overruns."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
from collections.abc import Callable

import pytest

from edgevm.flowwatch.drivers import ctevents, ctsource
from edgevm.flowwatch.drivers.ctevents import CtEventStream, Overrun
from edgevm.flowwatch.drivers.ctparse import CtEntry, CtKind, CtTuple
from edgevm.shared.netns import NamespaceNotFound

from .conftest import TcpPair, ping, udp_burst, udp_exchange

pytestmark = pytest.mark.root

TCP_ESTABLISHED, TCP_TIME_WAIT = 3, 7  # TCP_CONNTRACK_* of nf_conntrack_tcp.h
IPS_SEEN_REPLY, IPS_ASSURED = 1 << 1, 1 << 2


def conntrack_cli(netns: str, *args: str) -> str:
    """What the conntrack tool prints in netns."""
    return subprocess.run(
        ["ip", "netns", "exec", netns, "conntrack", *args], capture_output=True, text=True, check=True
    ).stdout


def find(entries: list[CtEntry], proto: int, sport: int, dport: int) -> CtEntry | None:
    """The entry whose original direction is proto from sport to dport."""
    for entry in entries:
        if (entry.orig.proto, entry.orig.sport, entry.orig.dport) == (proto, sport, dport):
            return entry
    return None


async def collect_until(
    stream: CtEventStream, done: Callable[[CtEntry], bool], timeout: float = 10
) -> list[CtEntry | Overrun]:
    """Every item the stream yields (entries and Overrun markers) until an entry satisfies done."""
    seen: list[CtEntry | Overrun] = []
    async with asyncio.timeout(timeout):
        async for batch in stream:
            if isinstance(batch, Overrun):
                seen.append(batch)
                continue
            seen.extend(batch)
            if any(done(entry) for entry in batch):
                return seen
    raise AssertionError("the stream ended")


def test_dump_finds_a_live_tcp_connection_with_the_counters_conntrack_shows(netns: str) -> None:
    pair = TcpPair(netns)
    try:
        pair.exchange(1000, 300)
        client, server = pair.ports
        entries = ctsource.dump(netns)
        shown = conntrack_cli(netns, "-L", "-p", "tcp", "--sport", str(client), "-o", "id")
    finally:
        pair.close()

    entry = find(entries, socket.IPPROTO_TCP, client, server)
    assert entry is not None
    assert entry.kind is CtKind.UPDATE
    assert entry.family == socket.AF_INET
    assert entry.orig == CtTuple("127.0.0.1", "127.0.0.1", socket.IPPROTO_TCP, client, server, None, None, None)
    assert entry.reply == CtTuple("127.0.0.1", "127.0.0.1", socket.IPPROTO_TCP, server, client, None, None, None)
    assert entry.tcp_state == TCP_ESTABLISHED
    assert entry.status & IPS_SEEN_REPLY and entry.status & IPS_ASSURED
    orig_counters, reply_counters = re.findall(r"packets=(\d+) bytes=(\d+)", shown)
    assert (entry.orig_packets, entry.orig_bytes) == tuple(map(int, orig_counters))
    assert (entry.reply_packets, entry.reply_bytes) == tuple(map(int, reply_counters))
    assert f"id={entry.id}" in shown
    assert entry.orig_bytes > 1000 and entry.reply_bytes > 300
    assert entry.start is not None and entry.stop is None


def test_dump_of_a_table_with_nothing_tracked_is_empty(netns: str) -> None:
    assert ctsource.dump(netns) == []


def test_dump_reads_ipv6_and_icmp_entries_too(netns: str) -> None:
    client, server = udp_exchange(netns, socket.AF_INET6)
    ping(netns, socket.AF_INET, ident=0x4242)
    entries = ctsource.dump(netns)
    udp6 = find(entries, socket.IPPROTO_UDP, client, server)
    assert udp6 is not None and udp6.family == socket.AF_INET6 and udp6.orig.src == "::1"
    icmp = [e for e in entries if e.orig.proto == socket.IPPROTO_ICMP]
    assert [(e.orig.icmp_id, e.orig.icmp_type, e.reply.icmp_type) for e in icmp] == [(0x4242, 8, 0)]


def test_dump_of_a_missing_namespace_raises() -> None:
    with pytest.raises(NamespaceNotFound):
        ctsource.dump("edgevm-t-never-created")


async def test_events_follow_a_short_tcp_connection_from_new_to_destroy(netns: str) -> None:
    async with ctevents.events(netns) as stream:
        pair = TcpPair(netns)
        pair.exchange(1000, 300)
        client, server = pair.ports
        pair.close()
        await asyncio.sleep(1.2)  # TIME_WAIT (1 s in this namespace) runs out...
        await asyncio.to_thread(ctsource.dump, netns)  # ...and a dump reaps the expired entry at once

        def destroyed(e: CtEntry) -> bool:
            return e.kind is CtKind.DESTROY and (e.orig.sport, e.orig.dport) == (client, server)

        seen = await collect_until(stream, destroyed)

    mine = [e for e in seen if isinstance(e, CtEntry) and (e.orig.sport, e.orig.dport) == (client, server)]
    kinds = [e.kind for e in mine]
    assert kinds[0] is CtKind.NEW and kinds[-1] is CtKind.DESTROY
    assert set(kinds[1:-1]) == {CtKind.UPDATE}
    assert {TCP_ESTABLISHED, TCP_TIME_WAIT} <= {e.tcp_state for e in mine}
    assert len({e.id for e in mine}) == 1
    end = mine[-1]
    assert end.orig_bytes > 1000 and end.reply_bytes > 300
    assert end.orig_packets >= 3 and end.reply_packets >= 3
    assert end.start < end.stop
    assert not any(isinstance(e, Overrun) for e in seen)


@pytest.mark.parametrize("flow", ["udp4", "tcp6", "icmp4", "icmp6"])
async def test_delete_removes_the_entry_once(netns: str, flow: str) -> None:
    pair = None
    if flow == "udp4":
        client, server = udp_exchange(netns)
        proto = socket.IPPROTO_UDP
        wanted = lambda e: (e.orig.proto, e.orig.sport, e.orig.dport) == (proto, client, server)  # noqa: E731
    elif flow == "tcp6":
        pair = TcpPair(netns, socket.AF_INET6)
        pair.exchange(10, 10)
        client, server = pair.ports
        proto = socket.IPPROTO_TCP
        wanted = lambda e: (e.orig.proto, e.orig.sport, e.orig.dport) == (proto, client, server)  # noqa: E731
    else:
        family = socket.AF_INET if flow == "icmp4" else socket.AF_INET6
        proto = socket.IPPROTO_ICMP if flow == "icmp4" else socket.IPPROTO_ICMPV6
        ping(netns, family, ident=0x0707)
        wanted = lambda e: (e.orig.proto, e.orig.icmp_id) == (proto, 0x0707)  # noqa: E731
    try:
        [entry] = [e for e in await asyncio.to_thread(ctsource.dump, netns) if wanted(e)]
        assert await ctsource.delete(netns, entry) is True
        assert [e for e in await asyncio.to_thread(ctsource.dump, netns) if wanted(e)] == []
        assert await ctsource.delete(netns, entry) is False
    finally:
        if pair is not None:
            pair.close()


async def test_overrun_is_reported_and_events_flow_again_after_it(netns: str) -> None:
    async with ctevents.events(netns, rcvbuf=4096) as stream:
        udp_burst(netns, 3000)  # nobody reads meanwhile: the socket buffer holds a handful of events
        before: list[CtEntry] = []
        async with asyncio.timeout(10):
            async for batch in stream:
                if isinstance(batch, Overrun):
                    break
                before.extend(batch)
        assert batch == Overrun(number=1) and stream.overruns == 1
        assert len(before) < 3000

        client, server = await asyncio.to_thread(udp_exchange, netns)

        def after_burst(e: CtEntry) -> bool:
            return (e.orig.sport, e.orig.dport) == (client, server)

        after = await collect_until(stream, after_burst)

    # what was queued when the loss was seen went with it: nothing older than the loss follows the marker
    assert after and all(isinstance(e, CtEntry) and after_burst(e) for e in after)
    assert stream.overruns == 1


async def test_close_ends_a_waiting_reader(netns: str) -> None:
    stream = ctevents.events(netns)
    await stream.open()

    async def read_all() -> list[list[CtEntry] | Overrun]:
        return [batch async for batch in stream]

    reader = asyncio.create_task(read_all())
    await asyncio.sleep(0.05)
    stream.close()
    assert await asyncio.wait_for(reader, 2) == []


async def test_lookup_reads_an_entrys_counters_now_and_none_once_it_is_gone(netns: str) -> None:
    pair = TcpPair(netns)
    lookup = ctsource.CtLookup(netns)
    try:
        pair.exchange(1000, 300)
        client, server = pair.ports
        client_udp, server_udp = udp_exchange(netns)
        entries = ctsource.dump(netns)
        tcp = find(entries, socket.IPPROTO_TCP, client, server)
        udp = find(entries, socket.IPPROTO_UDP, client_udp, server_udp)
        assert tcp is not None and udp is not None
        pair.exchange(5000, 0)
        now_tcp, now_udp = await lookup.get([tcp, udp])
        assert now_tcp is not None and now_tcp.orig == tcp.orig and now_tcp.id == tcp.id
        assert now_tcp.orig_bytes > tcp.orig_bytes + 5000 and now_tcp.tcp_state == TCP_ESTABLISHED
        assert now_udp is not None and now_udp.reply_bytes == udp.reply_bytes
        assert await ctsource.delete(netns, tcp)
        gone, still, gone_again = await lookup.get([tcp, udp, tcp])
        assert gone is None and gone_again is None
        assert still is not None and still.orig == udp.orig
    finally:
        lookup.close()
        pair.close()


def test_sockets_are_made_by_pyroute2_in_the_namespace_and_a_missing_one_is_never_created() -> None:
    with pytest.raises(NamespaceNotFound):
        ctsource.open_socket("edgevm-t-never-created", ctsource.EVENT_GROUPS)
    assert not os.path.exists("/run/netns/edgevm-t-never-created")  # pyroute2 would create it by default


def test_a_dump_with_no_answer_raises_timeout_error() -> None:
    mute, _other = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with mute, _other, pytest.raises(TimeoutError):
        ctsource.dump(None, timeout=0.2, sock=mute)


async def test_lookup_opens_one_socket_for_concurrent_gets_wraps_its_sequence_and_stays_closed(netns: str) -> None:
    client, server = udp_exchange(netns)
    [entry] = [e for e in ctsource.dump(netns) if (e.orig.sport, e.orig.dport) == (client, server)]
    lookup = ctsource.CtLookup(netns)
    fds_before = len(os.listdir("/proc/self/fd"))
    try:
        results = await asyncio.gather(*(lookup.get([entry]) for _ in range(5)))
        assert all(found is not None and found.orig == entry.orig for [found] in results)
        assert len(os.listdir("/proc/self/fd")) == fds_before + 1  # one socket, however many asked at once
        lookup._seq = 0xFFFFFFFF - 1  # two requests from wrapping: netlink's sequence numbers are 32 bits
        assert [e is not None for e in await lookup.get([entry, entry, entry])] == [True, True, True]
        assert [e is not None for e in await lookup.get([entry])] == [True]
    finally:
        lookup.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before
    with pytest.raises(OSError):
        await lookup.get([entry])  # a closed lookup (its watch is gone) opens nothing again
    assert len(os.listdir("/proc/self/fd")) == fds_before
