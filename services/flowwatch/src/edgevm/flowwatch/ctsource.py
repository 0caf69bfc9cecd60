"""The conntrack table of a network namespace over ctnetlink: dumps, event batches, deletion."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from pyroute2.netlink.exceptions import NetlinkError as Pyroute2NetlinkError
from pyroute2.netlink.nfnetlink import (
    NFNLGRP_CONNTRACK_DESTROY,
    NFNLGRP_CONNTRACK_NEW,
    NFNLGRP_CONNTRACK_UPDATE,
)
from pyroute2.netlink.nfnetlink.nfctsocket import AsyncNFCTSocket, NFCTAttrTuple

from edgevm.flowwatch.ctparse import (
    CTA_IP_V4_DST,
    CTA_IP_V4_SRC,
    CTA_IP_V6_DST,
    CTA_IP_V6_SRC,
    CTA_PROTO_DST_PORT,
    CTA_PROTO_ICMP_CODE,
    CTA_PROTO_ICMP_ID,
    CTA_PROTO_ICMP_TYPE,
    CTA_PROTO_ICMPV6_CODE,
    CTA_PROTO_ICMPV6_ID,
    CTA_PROTO_ICMPV6_TYPE,
    CTA_PROTO_NUM,
    CTA_PROTO_SRC_PORT,
    CTA_TUPLE_IP,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_PROTO,
    CTA_TUPLE_REPLY,
    CTA_ZONE,
    NLA_F_NESTED,
    NLMSG_DONE,
    NLMSG_ERROR,
    CtEntry,
    CtTuple,
    NetlinkError,
    ends_dump,
    parse_into,
)
from edgevm.flowwatch.netns import call_in_netns, write_sysctl

__all__ = [
    "EVENT_GROUPS",
    "CtEventStream",
    "CtLookup",
    "Overrun",
    "delete",
    "dump",
    "dump_raw",
    "enable_accounting",
    "events",
    "open_socket",
]

NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33  # not exported by the socket module
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IPCTNL_MSG_CT_GET = 1 << 8 | 1

# bind() takes a bit mask in which group n is bit n-1: passing the group numbers ORed together
# (1 | 2 | 3 == 3) silently leaves DESTROY out.
EVENT_GROUPS = (
    1 << (NFNLGRP_CONNTRACK_NEW - 1) | 1 << (NFNLGRP_CONNTRACK_UPDATE - 1) | 1 << (NFNLGRP_CONNTRACK_DESTROY - 1)
)
EVENT_RCVBUF = 32 << 20
RECV_SIZE = 65536  # above the kernel's 32 KiB cap on one dump datagram


def open_socket(netns: str | None, groups: int = 0, rcvbuf: int | None = None) -> socket.socket:
    """A NETLINK_NETFILTER socket in netns, bound to the multicast groups in the bit mask groups."""

    def create() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_NETFILTER)
        try:
            if rcvbuf is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
                except PermissionError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.bind((0, groups))
        except BaseException:
            sock.close()
            raise
        return sock

    return call_in_netns(netns, create)


def enable_accounting(netns: str | None) -> None:
    """Turn on byte/packet counters and start/stop timestamps for the conntrack entries netns creates next."""
    write_sysctl(netns, "net.netfilter.nf_conntrack_acct", "1")
    write_sysctl(netns, "net.netfilter.nf_conntrack_timestamp", "1")


_DUMP_REQUEST = struct.pack("=IHHIIBBH", 20, IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, 1, 0, 0, 0, 0)


def dump(netns: str | None, timeout: float = 30.0) -> list[CtEntry]:
    """Every conntrack entry (IPv4 and IPv6) in netns; blocking, so async callers use a thread.

    The kernel fills each datagram of a dump inside recv(): a second thread receives while this one parses,
    so the kernel's work and ours overlap (recv releases the GIL).
    """
    entries: list[CtEntry] = []
    with open_socket(netns) as sock:
        next_datagram = _start_dump(sock, timeout)
        received: queue.SimpleQueue[bytes | BaseException] = queue.SimpleQueue()

        def receive() -> None:
            try:
                while True:
                    datagram = next_datagram()
                    received.put(datagram)
                    if _ends_with_done(datagram):
                        return
            except BaseException as exc:  # handed to the parsing thread, which raises it
                received.put(exc)

        receiver = threading.Thread(target=receive, name="conntrack-dump", daemon=True)
        receiver.start()
        try:
            while True:
                item = received.get(timeout=timeout)
                if isinstance(item, BaseException):
                    raise item
                if parse_into(item, entries):
                    break
        finally:
            if receiver.is_alive():  # we failed first: stop it (a netlink socket may refuse shutdown)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            receiver.join(timeout)
    return entries


_DONE_TYPE_AT = -20 + 4  # NLMSG_DONE is a 20-byte message, the last of the dump's last datagram


def _ends_with_done(datagram: bytes) -> bool:
    """True if the datagram ends with NLMSG_DONE, or carries an error (the parser raises that one)."""
    if len(datagram) >= 20 and struct.unpack_from("=H", datagram, len(datagram) + _DONE_TYPE_AT)[0] == NLMSG_DONE:
        return True
    return ends_dump(datagram) if len(datagram) < 256 else False


def dump_raw(netns: str | None, timeout: float = 30.0) -> list[bytes]:
    """The datagrams of a full conntrack table dump in netns, unparsed."""
    datagrams: list[bytes] = []
    with open_socket(netns) as sock:
        next_datagram = _start_dump(sock, timeout)
        while not datagrams or not ends_dump(datagrams[-1]):
            datagrams.append(next_datagram())
    return datagrams


def _start_dump(sock: socket.socket, timeout: float) -> Callable[[], bytes]:
    """Ask for a dump; the function returned reads the next datagram of the answer, within the deadline."""
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    sock.send(_DUMP_REQUEST)

    def next_datagram() -> bytes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"conntrack dump took over {timeout} s")
        return sock.recv(RECV_SIZE)

    return next_datagram


async def delete(netns: str | None, entry: CtEntry, timeout: float = 5.0) -> bool:
    """Delete the conntrack entry with entry's original tuple, zone and id; False if there was none."""
    o = entry.orig
    tuple_orig = NFCTAttrTuple(
        family=entry.family,
        saddr=o.src,
        daddr=o.dst,
        proto=o.proto,
        sport=o.sport,
        dport=o.dport,
        icmp_id=o.icmp_id,
        icmp_type=o.icmp_type,
        icmp_code=o.icmp_code,
    )
    extra = {"zone": entry.zone} if entry.zone else {}
    if entry.id is not None:
        # spares a newer entry with the same tuple only when its id differs: ids hash the entry's
        # address and tuples, so one recreated at once often has the same id
        extra["id"] = entry.id
    sock = await asyncio.to_thread(open_socket, netns)
    ct = AsyncNFCTSocket(nfgen_family=entry.family, use_socket=sock)
    try:
        async with asyncio.timeout(timeout):
            await ct.entry("del", tuple_orig=tuple_orig, **extra)
    except Pyroute2NetlinkError as exc:
        if exc.code == errno.ENOENT:
            return False
        raise NetlinkError(exc.code, str(exc)) from None
    finally:
        ct.close()
        sock.close()
    return True


class Overrun(NamedTuple):
    """The kernel dropped events because the socket buffer was full: resync with a dump."""

    number: int  # 1 for the stream's first overrun, and so on


class CtEventStream:
    """Batches of conntrack events from one network namespace, as an async iterator of lists.

    An Overrun item stands where events were lost, and replaces every event still queued then (the kernel
    reports the loss before them), so no event older than the loss follows it: dump to resync. Open the
    stream (async with) before the start-up dump, so that nothing falls between the dump and the first batch.
    """

    def __init__(self, netns: str | None, rcvbuf: int = EVENT_RCVBUF, max_batch: int = 1024) -> None:
        self.netns = netns
        self.rcvbuf = rcvbuf
        self.max_batch = max_batch
        self.overruns = 0
        self._sock: socket.socket | None = None
        self._closed = False
        self._overrun_pending = False
        self._wakeup: asyncio.Future[None] | None = None

    async def open(self) -> None:
        """Subscribe to the namespace's NEW, UPDATE and DESTROY events."""
        if self._sock is None and not self._closed:
            sock = await asyncio.to_thread(open_socket, self.netns, EVENT_GROUPS, self.rcvbuf)
            sock.setblocking(False)
            if self._closed:
                sock.close()
            else:
                self._sock = sock

    def close(self) -> None:
        """Unsubscribe; the stream ends, also for a reader waiting on it."""
        self._closed = True
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._wakeup is not None:
            self._wakeup.get_loop().remove_reader(sock.fileno())
            self._wake()
        sock.close()

    async def __aenter__(self) -> CtEventStream:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __aiter__(self) -> CtEventStream:
        return self

    async def __anext__(self) -> list[CtEntry] | Overrun:
        await self.open()
        while True:
            if self._overrun_pending:
                self._overrun_pending = False
                return Overrun(self.overruns)
            sock = self._sock
            if sock is None:
                raise StopAsyncIteration
            await self._readable(sock)
            batch = self._drain()
            if batch:
                return batch

    async def _readable(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        fd = sock.fileno()
        self._wakeup = loop.create_future()
        loop.add_reader(fd, self._wake)
        try:
            await self._wakeup
        finally:
            self._wakeup = None
            if self._sock is sock:
                loop.remove_reader(fd)

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _drain(self) -> list[CtEntry]:
        """The events queued on the socket, up to max_batch datagrams (one event each)."""
        batch: list[CtEntry] = []
        if self._sock is None:
            return batch
        recv = self._sock.recv
        for _ in range(self.max_batch):
            try:
                data = recv(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1
                self._overrun_pending = True
                _discard_queued(recv)
                break
            parse_into(data, batch)
        return batch


def _discard_queued(recv: Callable[[int], bytes]) -> None:
    """Drop what is queued on an event socket after an overrun: all of it predates the lost events."""
    for _ in range(1 << 20):
        try:
            recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise


def events(netns: str | None, rcvbuf: int = EVENT_RCVBUF, max_batch: int = 1024) -> CtEventStream:
    """A stream of conntrack event batches from netns; use it as `async with events(ns) as stream`."""
    return CtEventStream(netns, rcvbuf, max_batch)


def _nla(atype: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, atype) + payload + bytes(-size % 4)


def _tuple_attr(family: int, t: CtTuple) -> bytes:
    """A CTA_TUPLE_* payload for a request: addresses, protocol, and ports or ICMP id, type and code."""
    if family == socket.AF_INET:
        ip = _nla(CTA_IP_V4_SRC, socket.inet_pton(family, t.src)) + _nla(CTA_IP_V4_DST, socket.inet_pton(family, t.dst))
    else:
        ip = _nla(CTA_IP_V6_SRC, socket.inet_pton(family, t.src)) + _nla(CTA_IP_V6_DST, socket.inet_pton(family, t.dst))
    proto = _nla(CTA_PROTO_NUM, bytes((t.proto,)))
    if t.sport is not None and t.dport is not None:
        proto += _nla(CTA_PROTO_SRC_PORT, struct.pack("!H", t.sport))
        proto += _nla(CTA_PROTO_DST_PORT, struct.pack("!H", t.dport))
    elif t.icmp_type is not None:
        ident, kind, code = (
            (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE)
            if family == socket.AF_INET
            else (CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE)
        )
        proto += _nla(ident, struct.pack("!H", t.icmp_id or 0))
        proto += _nla(kind, bytes((t.icmp_type,))) + _nla(code, bytes((t.icmp_code or 0,)))
    return _nla(NLA_F_NESTED | CTA_TUPLE_IP, ip) + _nla(NLA_F_NESTED | CTA_TUPLE_PROTO, proto)


def get_request(entry: CtEntry, seq: int, by_reply: bool = False) -> bytes:
    """The ctnetlink request for the current state of the entry with entry's original (or reply) tuple."""
    body = struct.pack("=BBH", entry.family, 0, 0)
    if by_reply:
        body += _nla(NLA_F_NESTED | CTA_TUPLE_REPLY, _tuple_attr(entry.family, entry.reply))
    else:
        body += _nla(NLA_F_NESTED | CTA_TUPLE_ORIG, _tuple_attr(entry.family, entry.orig))
    if entry.zone:
        body += _nla(CTA_ZONE, struct.pack("!H", entry.zone))
    return struct.pack("=IHHII", 16 + len(body), IPCTNL_MSG_CT_GET, NLM_F_REQUEST, seq, 0) + body


class CtLookup:
    """Looks conntrack entries up by their original tuple in one namespace, many per round trip.

    Events carry counters only on DESTROY: this reads them for a TCP flow that is over but whose entry
    lingers (TIME_WAIT). One socket, opened once; requests are pipelined and matched by sequence number.
    """

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._sock: socket.socket | None = None
        self._seq = 0
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        """Open the request socket in the namespace."""
        if self._sock is None:
            sock = await asyncio.to_thread(open_socket, self.netns, 0, 4 << 20)
            sock.setblocking(False)
            self._sock = sock

    def close(self) -> None:
        """Close the socket."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    async def get(
        self, entries: list[CtEntry], timeout: float = 2.0, by_reply: bool = False
    ) -> list[CtEntry | None]:
        """The current state of each entry, found by its original (or reply) tuple; None where there is none."""
        if not entries:
            return []
        await self.open()
        assert self._sock is not None
        async with self._lock, asyncio.timeout(timeout):
            sock = self._sock
            loop = asyncio.get_running_loop()
            first = self._seq + 1
            self._seq += len(entries)
            for n, entry in enumerate(entries):
                await loop.sock_sendall(sock, get_request(entry, first + n, by_reply))
            results: list[CtEntry | None] = [None] * len(entries)
            answered = 0
            while answered < len(entries):
                data = await loop.sock_recv(sock, RECV_SIZE)
                off = 0
                while off + 16 <= len(data):
                    length, mtype, _flags, seq = struct.unpack_from("=IHHI", data, off)
                    if length < 16:
                        break
                    index = seq - first
                    if 0 <= index < len(entries):
                        answered += 1
                        if mtype != NLMSG_ERROR:
                            found: list[CtEntry] = []
                            parse_into(data[off : off + length], found)
                            results[index] = found[0] if found else None
                    off = (off + length + 3) & ~3
            return results
