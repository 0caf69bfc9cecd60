"""The conntrack table of a network namespace over ctnetlink: dumps, event batches, lookups, deletion.

Every socket is made by pyroute2 in the namespace (its `NFCTSocket` machinery: the socket is created inside
the namespace and its buffers set); what the sockets receive is read as raw bytes by ctparse, a struct-based
parser of the few attributes flowwatch needs, since pyroute2's own decoder costs 6x more per message and
its object layers 100x (ENVIRONMENT.md). Deletion goes through pyroute2's `entry("del")`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import time
from collections.abc import Callable, Iterable

from pyroute2 import config as pyroute2_config
from pyroute2.netlink import NETLINK_ADD_MEMBERSHIP, SOL_NETLINK
from pyroute2.netlink.exceptions import NetlinkError as Pyroute2NetlinkError
from pyroute2.netlink.nfnetlink import (
    NFNLGRP_CONNTRACK_DESTROY,
    NFNLGRP_CONNTRACK_NEW,
    NFNLGRP_CONNTRACK_UPDATE,
)
from pyroute2.netlink.nfnetlink.nfctsocket import AsyncNFCTSocket, NFCTAttrTuple

from edgevm.flowwatch.drivers.ctnetlink import (
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
    NLMSG_ERROR,
    CtEntry,
    CtTuple,
    NetlinkError,
)
from edgevm.flowwatch.drivers.ctparse import ends_dump, parse_into
from edgevm.shared.netns import NamespaceNotFound, write_sysctl

__all__ = [
    "EVENT_GROUPS",
    "CtLookup",
    "delete",
    "dump",
    "dump_raw",
    "enable_accounting",
    "open_socket",
]

# pyroute2 makes a socket in a namespace in a forked child that it ends with SIGTERM. The child inherits
# asyncio's signal handler and wakeup fd: its SIGTERM would reach our event loop as the service's own (and
# stop it). With this set the child takes SIGTERM with the default action, and our loop hears nothing.
pyroute2_config.disable_mp_signal = True

SO_RCVBUFFORCE = 33  # not exported by the socket module
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IPCTNL_MSG_CT_GET = 1 << 8 | 1

# Joined one by one (NETLINK_ADD_MEMBERSHIP takes a group number; bind() would take a bit mask).
EVENT_GROUPS = (NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_UPDATE, NFNLGRP_CONNTRACK_DESTROY)
EVENT_RCVBUF = 32 << 20
RECV_SIZE = 65536  # above the kernel's 32 KiB cap on one dump datagram
_SEQ_MASK = 0xFFFFFFFF


def open_socket(netns: str | None, groups: Iterable[int] = (), rcvbuf: int | None = None) -> socket.socket:
    """A NETLINK_NETFILTER socket that pyroute2 makes in netns, subscribed to the multicast groups.

    Blocking (pyroute2 enters the namespace in a short-lived child process, ~10 ms): async callers use a
    thread. The receive buffer is pyroute2's, then raised to rcvbuf with SO_RCVBUFFORCE (we are root) past
    net.core.rmem_max, which caps pyroute2's SO_RCVBUF.
    """
    maker = AsyncNFCTSocket(netns=netns, flags=0, rcvbuf=rcvbuf or 1 << 20)  # flags=0: never create netns
    try:
        sock: socket.socket = maker.setup_socket()
    except FileNotFoundError:
        raise NamespaceNotFound(netns) from None
    try:
        if rcvbuf is not None:
            with contextlib.suppress(PermissionError):
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        sock.bind((0, 0))
        for group in groups:
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
    except BaseException:
        sock.close()
        raise
    return sock


def enable_accounting(netns: str | None) -> None:
    """Turn on byte/packet counters, start/stop timestamps and events for the conntrack entries netns creates
    next. Events: the kernel's default (2) gives an entry events only if a listener existed when it was made,
    so an entry made while flowwatch was down would never report its end."""
    write_sysctl(netns, "net.netfilter.nf_conntrack_acct", "1")
    write_sysctl(netns, "net.netfilter.nf_conntrack_timestamp", "1")
    write_sysctl(netns, "net.netfilter.nf_conntrack_events", "1")


_DUMP_REQUEST = struct.pack("=IHHIIBBH", 20, IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, 1, 0, 0, 0, 0)


def dump(netns: str | None, timeout: float = 30.0, sock: socket.socket | None = None) -> list[CtEntry]:
    """Every conntrack entry (IPv4 and IPv6) in netns, on sock (a socket of open_socket kept for dumps; by
    default one made for this dump); blocking, so async callers use a thread. TimeoutError past timeout s:
    then sock holds what is left of the answer, so close it.

    Each datagram is parsed as it comes: the kernel fills the next one inside our recv(). (A receiving thread
    beside the parsing one was no faster: the two contend for the GIL.)
    """
    if sock is None:
        with open_socket(netns) as own:
            return dump(netns, timeout, own)
    entries: list[CtEntry] = []
    next_datagram = _start_dump(sock, timeout)
    try:
        while not parse_into(next_datagram(), entries):
            pass
    except TimeoutError:
        where = netns or "the node namespace"
        raise TimeoutError(f"conntrack dump in {where} took over {timeout} s") from None
    return entries


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
    lingers (TIME_WAIT), and for listed active flows. One socket, opened on first use (and again after
    `reset`, e.g. for a namespace made anew); requests are pipelined and matched by sequence number, which
    wraps at 2^32 as netlink's does. Once `close`d it opens nothing again: get() raises OSError.
    """

    CHUNK = 2048  # requests in flight at once: their answers fit the 4 MiB receive buffer

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._sock: socket.socket | None = None
        self._seq = 0
        self._lock = asyncio.Lock()
        self._closed = False

    async def _open(self) -> socket.socket:
        """The request socket, opened in the namespace if it is not (under the lock: one socket only)."""
        if self._closed:
            raise OSError(errno.EBADF, f"the conntrack lookup of {self.netns or 'the node namespace'} is closed")
        if self._sock is None:
            sock = await asyncio.to_thread(open_socket, self.netns, (), 4 << 20)
            sock.setblocking(False)
            if self._closed:
                sock.close()
                raise OSError(errno.EBADF, "the conntrack lookup was closed meanwhile")
            self._sock, self._seq = sock, 0
        return self._sock

    def reset(self) -> None:
        """Close the socket; the next get() opens a new one (in the namespace that has the name then)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def close(self) -> None:
        """Close the socket for good."""
        self._closed = True
        self.reset()

    async def get(
        self, entries: list[CtEntry], timeout: float = 2.0, by_reply: bool = False
    ) -> list[CtEntry | None]:
        """The current state of each entry, found by its original (or reply) tuple; None where there is none."""
        if not entries:
            return []
        results: list[CtEntry | None] = []
        async with self._lock, asyncio.timeout(timeout):
            sock = await self._open()
            for at in range(0, len(entries), self.CHUNK):
                results += await self._round(sock, entries[at : at + self.CHUNK], by_reply)
        return results

    async def _round(self, sock: socket.socket, entries: list[CtEntry], by_reply: bool) -> list[CtEntry | None]:
        loop = asyncio.get_running_loop()
        first = (self._seq + 1) & _SEQ_MASK
        self._seq = (self._seq + len(entries)) & _SEQ_MASK
        requests = b"".join(get_request(entry, (first + n) & _SEQ_MASK, by_reply) for n, entry in enumerate(entries))
        await loop.sock_sendall(sock, requests)
        results: list[CtEntry | None] = [None] * len(entries)
        answered = 0
        while answered < len(entries):
            data = await loop.sock_recv(sock, RECV_SIZE)
            off = 0
            while off + 16 <= len(data):
                length, mtype, _flags, seq = struct.unpack_from("=IHHI", data, off)
                if length < 16:
                    break
                index = (seq - first) & _SEQ_MASK  # answers to an abandoned earlier round fall outside
                if index < len(entries):
                    answered += 1
                    if mtype != NLMSG_ERROR:
                        found: list[CtEntry] = []
                        parse_into(data[off : off + length], found)
                        results[index] = found[0] if found else None
                off = (off + length + 3) & ~3
        return results
