"""A struct-based parser of ctnetlink messages: conntrack entries from events and table dumps."""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Callable
from socket import AF_INET, AF_INET6, inet_ntop
from typing import Any, NamedTuple

__all__ = ["CtEntry", "CtKind", "CtTuple", "NetlinkError", "ends_dump", "parse", "parse_into"]

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_CREATE_EXCL = 0x400 | 0x200
IPCTNL_MSG_CT_NEW = 1 << 8 | 0  # NFNL_SUBSYS_CTNETLINK << 8 | message
IPCTNL_MSG_CT_DELETE = 1 << 8 | 2

# Attribute types, from include/uapi/linux/netfilter/nfnetlink_conntrack.h.
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO = 1, 2, 3, 4
CTA_MARK, CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY, CTA_ID = 8, 9, 10, 12
CTA_ZONE, CTA_TIMESTAMP = 18, 20
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE = 4, 5, 6
CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE = 7, 8, 9
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 1, 1
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES, CTA_COUNTERS32_PACKETS, CTA_COUNTERS32_BYTES = 1, 2, 3, 4
CTA_TIMESTAMP_START, CTA_TIMESTAMP_STOP = 1, 2

NLA_F_NESTED = 0x8000
_TYPE_MASK = 0x3FFF  # drops NLA_F_NESTED and NLA_F_NET_BYTEORDER
_RARER_ATTRS = frozenset((CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY, CTA_MARK, CTA_ZONE, CTA_TIMESTAMP))

_nlmsghdr = struct.Struct("=IHH").unpack_from
_nla = struct.Struct("=HH").unpack_from
_be_u16 = struct.Struct("!H").unpack_from
_be_u32 = struct.Struct("!I").unpack_from
_be_u64 = struct.Struct("!Q").unpack_from
_s32 = struct.Struct("=i").unpack_from
_tuple_new = tuple.__new__
# Two 64-bit attributes, types 1 and 2, read in one unpack: big-endian for the values, so the native
# (little-endian) headers (12, 1) and (12, 2) come out byte-swapped.
_two_be64 = struct.Struct("!HHQHHQ").unpack_from
_TWO_BE64_HEADERS = (12 << 8, 1 << 8, 12 << 8, 2 << 8)


class CtKind(enum.StrEnum):
    """What a conntrack message says happened to its entry."""

    NEW = "new"
    UPDATE = "update"  # also every entry of a table dump
    DESTROY = "destroy"


_NEW, _UPDATE, _DESTROY = CtKind.NEW, CtKind.UPDATE, CtKind.DESTROY


class CtTuple(NamedTuple):
    """One direction of a connection; ports are None for ICMP, the icmp fields None otherwise."""

    src: str
    dst: str
    proto: int
    sport: int | None
    dport: int | None
    icmp_id: int | None
    icmp_type: int | None
    icmp_code: int | None


class CtEntry(NamedTuple):
    """A conntrack entry as one ctnetlink message describes it; None where the message said nothing."""

    kind: CtKind
    family: int
    orig: CtTuple
    reply: CtTuple
    status: int
    tcp_state: int | None
    mark: int
    zone: int
    id: int | None
    orig_packets: int | None  # counters need nf_conntrack_acct, and events carry them on DESTROY only
    orig_bytes: int | None
    reply_packets: int | None
    reply_bytes: int | None
    start: int | None  # ns since the epoch; needs nf_conntrack_timestamp
    stop: int | None


class NetlinkError(OSError):
    """An error the kernel answered a ctnetlink request with."""


def parse(buf: bytes) -> list[CtEntry]:
    """The conntrack entries in a bytes buffer of netlink messages (one recv() result)."""
    out: list[CtEntry] = []
    parse_into(buf, out)
    return out


def parse_into(buf: bytes, out: list[CtEntry]) -> bool:
    """Append the entries in buf to out; True if buf ends a dump; NetlinkError for an error answer."""
    append = out.append
    size = len(buf)
    off = 0
    while off + 16 <= size:
        length, mtype, flags = _nlmsghdr(buf, off)
        if length < 16:
            break
        end = off + length
        if mtype == IPCTNL_MSG_CT_NEW:
            kind = _NEW if flags & NLM_F_CREATE_EXCL == NLM_F_CREATE_EXCL else _UPDATE
        elif mtype == IPCTNL_MSG_CT_DELETE:
            kind = _DESTROY
        elif mtype == NLMSG_DONE:
            return True
        else:
            if mtype == NLMSG_ERROR:
                (code,) = _s32(buf, off + 16)
                if code:  # 0 is an acknowledgement
                    raise NetlinkError(-code, os.strerror(-code))
            off = (end + 3) & ~3
            continue
        family = buf[off + 16]
        orig = reply = None
        status = mark = zone = 0
        tcp_state = ct_id = start = stop = None
        opkts = obytes = rpkts = rbytes = None
        known = _message_layouts.get(length)
        if known is not None and known.headers(buf, off + 20) == known.expected:
            # the same attributes at the same places as a message walked before: read them directly
            o_at, o_end, r_at, r_end, st_at, pi_at, pi_end, id_at, co_at, co_end, cr_at, cr_end, rare = known.at
            orig = _tuple(buf, off + o_at, off + o_end)
            reply = _tuple(buf, off + r_at, off + r_end)
            if st_at:
                (status,) = _be_u32(buf, off + st_at)
            if pi_at:
                tcp_state = _tcp_state(buf, off + pi_at, off + pi_end)
            if id_at:
                (ct_id,) = _be_u32(buf, off + id_at)
            if co_at:
                opkts, obytes = _pair_u64(buf, off + co_at, off + co_end)
            if cr_at:
                rpkts, rbytes = _pair_u64(buf, off + cr_at, off + cr_end)
            for atype, at, at_end in rare:
                if atype == CTA_MARK:
                    (mark,) = _be_u32(buf, off + at)
                elif atype == CTA_ZONE:
                    (zone,) = _be_u16(buf, off + at)
                else:
                    start, stop = _pair_u64(buf, off + at, off + at_end)
        else:
            seen: list[tuple[int, int, int]] = []  # (raw type, offset, length) of each attribute
            a = off + 20
            while a + 4 <= end:
                alen, atype = _nla(buf, a)
                if alen < 4:
                    break
                seen.append((atype, a - off, alen))
                atype &= _TYPE_MASK
                if atype <= CTA_PROTOINFO:
                    if atype == CTA_TUPLE_ORIG:
                        orig = _tuple(buf, a + 4, a + alen)
                    elif atype == CTA_TUPLE_REPLY:
                        reply = _tuple(buf, a + 4, a + alen)
                    elif atype == CTA_STATUS:
                        (status,) = _be_u32(buf, a + 4)
                    elif atype == CTA_PROTOINFO:
                        tcp_state = _tcp_state(buf, a + 4, a + alen)
                elif atype == CTA_ID:
                    (ct_id,) = _be_u32(buf, a + 4)
                elif atype in _RARER_ATTRS:
                    if atype == CTA_COUNTERS_ORIG:
                        opkts, obytes = _pair_u64(buf, a + 4, a + alen)
                    elif atype == CTA_COUNTERS_REPLY:
                        rpkts, rbytes = _pair_u64(buf, a + 4, a + alen)
                    elif atype == CTA_MARK:
                        (mark,) = _be_u32(buf, a + 4)
                    elif atype == CTA_ZONE:
                        (zone,) = _be_u16(buf, a + 4)
                    elif atype == CTA_TIMESTAMP:
                        start, stop = _pair_u64(buf, a + 4, a + alen)
                a += (alen + 3) & ~3
            if a == end and length not in _message_layouts:
                _learn_layout(length, seen)
        if orig is not None and reply is not None:
            append(
                _tuple_new(
                    CtEntry,
                    (
                        kind,
                        family,
                        orig,
                        reply,
                        status,
                        tcp_state,
                        mark,
                        zone,
                        ct_id,
                        opkts,
                        obytes,
                        rpkts,
                        rbytes,
                        start,
                        stop,
                    ),
                )
            )
        off = (end + 3) & ~3
    return False


class _MessageLayout(NamedTuple):
    """Where a message of one length and shape has its attributes: one unpack checks every header."""

    headers: Callable[[bytes, int], tuple[int, ...]]
    expected: tuple[int, ...]
    # offsets from the message start of: orig, its end, reply, its end, status, protoinfo, its end, id,
    # orig counters, their end, reply counters, their end (0: absent), then (type, at, end) of the rarer ones
    at: tuple[Any, ...]


# The kernel writes the entries of one kind (family, protocol, options on) the same way, so a dump's
# messages come in a handful of lengths and shapes: the first of each is walked, the rest read directly.
_message_layouts: dict[int, _MessageLayout | None] = {}
_MAX_LAYOUTS = 256


def _learn_layout(length: int, seen: list[tuple[int, int, int]]) -> None:
    """Remember where a walked message has its attributes, keyed by its length (None: not one shape)."""
    if len(_message_layouts) >= _MAX_LAYOUTS:
        return
    fmt, expected, pos = ["="], [], 20
    places: dict[int, tuple[int, int]] = {}
    rare = []
    for raw_type, at, alen in seen:
        fmt.append(f"{at - pos}x" if at > pos else "")
        fmt.append("HH")
        expected += [alen, raw_type]
        pos = at + 4
        atype = raw_type & _TYPE_MASK
        if atype in places:  # the same attribute twice: leave such messages to the walk
            _message_layouts[length] = None
            return
        places[atype] = (at + 4, at + alen)
        if atype in (CTA_MARK, CTA_ZONE, CTA_TIMESTAMP):
            rare.append((atype, at + 4, at + alen))
    if CTA_TUPLE_ORIG not in places or CTA_TUPLE_REPLY not in places:
        _message_layouts[length] = None
        return

    def where(atype: int) -> tuple[int, int]:
        return places.get(atype, (0, 0))

    o, r, pi, co, cr = (where(t) for t in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_PROTOINFO, CTA_COUNTERS_ORIG,
                                           CTA_COUNTERS_REPLY))
    offsets = (*o, *r, where(CTA_STATUS)[0], *pi, where(CTA_ID)[0], *co, *cr, tuple(rare))
    _message_layouts[length] = _MessageLayout(struct.Struct("".join(fmt)).unpack_from, tuple(expected), offsets)


def ends_dump(buf: bytes) -> bool:
    """True if buf holds the NLMSG_DONE that ends a dump, reading only message headers."""
    size = len(buf)
    off = 0
    while off + 16 <= size:
        length, mtype, _ = _nlmsghdr(buf, off)
        if length < 16:
            break
        if mtype == NLMSG_DONE:
            return True
        if mtype == NLMSG_ERROR:
            (code,) = _s32(buf, off + 16)
            if code:
                raise NetlinkError(-code, os.strerror(-code))
        off = (off + length + 3) & ~3
    return False


class _Layout(NamedTuple):
    """One way the kernel lays out a CTA_TUPLE_* payload: attribute headers, then values."""

    headers: Callable[[bytes, int], tuple[int, ...]]  # the (len, type) of every attribute
    expected: tuple[int, ...]
    values: Callable[[bytes, int], tuple[Any, ...]]  # (src, dst, proto, then ports or icmp id, type, code)
    icmp: bool


def _layout(
    headers: str, ip: tuple[tuple[int, int], ...], l4: tuple[tuple[int, int], ...], values: str, icmp: bool
) -> tuple[int, _Layout]:
    h, v = struct.Struct(headers), struct.Struct(values)
    expected = tuple(n for pair in ip + l4 for n in pair)
    assert h.size == v.size and len(expected) == len(h.unpack(bytes(h.size)))
    return h.size, _Layout(h.unpack_from, expected, v.unpack_from, icmp)


_IP, _PROTO = NLA_F_NESTED | CTA_TUPLE_IP, NLA_F_NESTED | CTA_TUPLE_PROTO
_IPV4 = ((20, _IP), (8, CTA_IP_V4_SRC), (8, CTA_IP_V4_DST))
_IPV6 = ((44, _IP), (20, CTA_IP_V6_SRC), (20, CTA_IP_V6_DST))
_PORTS = ((28, _PROTO), (5, CTA_PROTO_NUM), (6, CTA_PROTO_SRC_PORT), (6, CTA_PROTO_DST_PORT))
_ICMP = ((36, _PROTO), (5, CTA_PROTO_NUM), (6, CTA_PROTO_ICMP_ID), (5, CTA_PROTO_ICMP_TYPE), (5, CTA_PROTO_ICMP_CODE))
_ICMPV6 = (
    (36, _PROTO),
    (5, CTA_PROTO_NUM),
    (6, CTA_PROTO_ICMPV6_ID),
    (5, CTA_PROTO_ICMPV6_TYPE),
    (5, CTA_PROTO_ICMPV6_CODE),
)

# The kernel writes each family and protocol's tuple in one order and size (ctnetlink_dump_tuples):
# one unpack of the headers checks that, one unpack reads the values; anything else is walked.
_TUPLE_LAYOUTS = dict(
    (
        _layout("=HH HH4x HH4x HH HH4x HH4x HH4x", _IPV4, _PORTS, "!8x4s 4x4s 8xB3x 4xH2x 4xH2x", False),
        _layout("=HH HH4x HH4x HH HH4x HH4x HH4x HH4x", _IPV4, _ICMP, "!8x4s 4x4s 8xB3x 4xH2x 4xB3x 4xB3x", True),
        _layout("=HH HH16x HH16x HH HH4x HH4x HH4x", _IPV6, _PORTS, "!8x16s 4x16s 8xB3x 4xH2x 4xH2x", False),
        _layout("=HH HH16x HH16x HH HH4x HH4x HH4x HH4x", _IPV6, _ICMPV6, "!8x16s 4x16s 8xB3x 4xH2x 4xB3x 4xB3x", True),
    )
)

_addr_cache: dict[bytes, str] = {}


def _addr(raw: bytes) -> str:
    """The text of a raw IPv4 or IPv6 address, remembered (flows repeat their addresses)."""
    text = _addr_cache.get(raw)
    if text is None:
        if len(_addr_cache) >= 65536:
            _addr_cache.clear()
        text = _addr_cache[raw] = inet_ntop(AF_INET if len(raw) == 4 else AF_INET6, raw)
    return text


def _tuple(buf: bytes, a: int, end: int) -> CtTuple:
    layout = _TUPLE_LAYOUTS.get(end - a)
    if layout is not None:
        headers, expected, values, icmp = layout
        if headers(buf, a) == expected:
            if icmp:
                src, dst, proto, icmp_id, icmp_type, icmp_code = values(buf, a)
                sport = dport = None
            else:
                src, dst, proto, sport, dport = values(buf, a)
                icmp_id = icmp_type = icmp_code = None
            return _tuple_new(
                CtTuple,
                (
                    _addr_cache.get(src) or _addr(src),
                    _addr_cache.get(dst) or _addr(dst),
                    proto,
                    sport,
                    dport,
                    icmp_id,
                    icmp_type,
                    icmp_code,
                ),
            )
    return _tuple_walked(buf, a, end)


def _tuple_walked(buf: bytes, a: int, end: int) -> CtTuple:
    src = dst = ""
    proto = 0
    sport = dport = icmp_id = icmp_type = icmp_code = None
    while a + 4 <= end:
        alen, atype = _nla(buf, a)
        if alen < 4:
            break
        atype &= _TYPE_MASK
        nested_end = a + alen
        b = a + 4
        if atype == CTA_TUPLE_IP:
            while b + 4 <= nested_end:
                blen, btype = _nla(buf, b)
                if blen < 4:
                    break
                btype &= _TYPE_MASK
                if btype == CTA_IP_V4_SRC:
                    src = _addr(buf[b + 4 : b + 8])
                elif btype == CTA_IP_V4_DST:
                    dst = _addr(buf[b + 4 : b + 8])
                elif btype == CTA_IP_V6_SRC:
                    src = _addr(buf[b + 4 : b + 20])
                elif btype == CTA_IP_V6_DST:
                    dst = _addr(buf[b + 4 : b + 20])
                b += (blen + 3) & ~3
        elif atype == CTA_TUPLE_PROTO:
            while b + 4 <= nested_end:
                blen, btype = _nla(buf, b)
                if blen < 4:
                    break
                btype &= _TYPE_MASK
                if btype == CTA_PROTO_NUM:
                    proto = buf[b + 4]
                elif btype == CTA_PROTO_SRC_PORT:
                    (sport,) = _be_u16(buf, b + 4)
                elif btype == CTA_PROTO_DST_PORT:
                    (dport,) = _be_u16(buf, b + 4)
                elif btype == CTA_PROTO_ICMP_ID or btype == CTA_PROTO_ICMPV6_ID:
                    (icmp_id,) = _be_u16(buf, b + 4)
                elif btype == CTA_PROTO_ICMP_TYPE or btype == CTA_PROTO_ICMPV6_TYPE:
                    icmp_type = buf[b + 4]
                elif btype == CTA_PROTO_ICMP_CODE or btype == CTA_PROTO_ICMPV6_CODE:
                    icmp_code = buf[b + 4]
                b += (blen + 3) & ~3
        a += (alen + 3) & ~3
    return _tuple_new(CtTuple, (src, dst, proto, sport, dport, icmp_id, icmp_type, icmp_code))


def _pair_u64(buf: bytes, a: int, end: int) -> tuple[int | None, int | None]:
    """Attributes 1 and 2 of a nest: (packets, bytes) of CTA_COUNTERS_*, (start, stop) of CTA_TIMESTAMP."""
    if end - a == 24:
        len1, type1, first, len2, type2, second = _two_be64(buf, a)
        if (len1, type1, len2, type2) == _TWO_BE64_HEADERS:
            return first, second
    first = second = None
    while a + 4 <= end:
        alen, atype = _nla(buf, a)
        if alen < 4:
            break
        atype &= _TYPE_MASK
        if atype == CTA_COUNTERS_PACKETS:
            (first,) = _be_u64(buf, a + 4)
        elif atype == CTA_COUNTERS_BYTES:
            (second,) = _be_u64(buf, a + 4)
        elif atype == CTA_COUNTERS32_PACKETS:
            (first,) = _be_u32(buf, a + 4)
        elif atype == CTA_COUNTERS32_BYTES:
            (second,) = _be_u32(buf, a + 4)
        a += (alen + 3) & ~3
    return first, second


def _tcp_state(buf: bytes, a: int, end: int) -> int | None:
    while a + 4 <= end:
        alen, atype = _nla(buf, a)
        if alen < 4:
            break
        if atype & _TYPE_MASK == CTA_PROTOINFO_TCP:
            b, tcp_end = a + 4, a + alen
            while b + 4 <= tcp_end:
                blen, btype = _nla(buf, b)
                if blen < 4:
                    break
                if btype & _TYPE_MASK == CTA_PROTOINFO_TCP_STATE:
                    return buf[b + 4]
                b += (blen + 3) & ~3
        a += (alen + 3) & ~3
    return None
