"""Reading the fixed-size fields of a ctnetlink message: netlink headers, a connection's tuples, counters and
TCP state, each in one unpack where the kernel's layout is known (the parser in ctparse.py uses these)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from socket import AF_INET, AF_INET6, inet_ntop
from typing import Any, NamedTuple

from edgevm.flowwatch.drivers.ctnetlink import (
    CTA_COUNTERS32_BYTES,
    CTA_COUNTERS32_PACKETS,
    CTA_COUNTERS_BYTES,
    CTA_COUNTERS_PACKETS,
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
    CTA_PROTOINFO_TCP,
    CTA_PROTOINFO_TCP_STATE,
    CTA_TUPLE_IP,
    CTA_TUPLE_PROTO,
    NLA_F_NESTED,
    CtTuple,
)

TYPE_MASK = 0x3FFF  # drops NLA_F_NESTED and NLA_F_NET_BYTEORDER

nlmsghdr = struct.Struct("=IHH").unpack_from
nla = struct.Struct("=HH").unpack_from
be_u16 = struct.Struct("!H").unpack_from
be_u32 = struct.Struct("!I").unpack_from
be_u64 = struct.Struct("!Q").unpack_from
s32 = struct.Struct("=i").unpack_from
tuple_new = tuple.__new__
# Two 64-bit attributes, types 1 and 2, read in one unpack: big-endian for the values, so the native
# (little-endian) headers (12, 1) and (12, 2) come out byte-swapped.
two_be64 = struct.Struct("!HHQHHQ").unpack_from
TWO_BE64_HEADERS = (12 << 8, 1 << 8, 12 << 8, 2 << 8)


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


def read_tuple(buf: bytes, a: int, end: int) -> CtTuple:
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
            return tuple_new(
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
        alen, atype = nla(buf, a)
        if alen < 4:
            break
        atype &= TYPE_MASK
        nested_end = a + alen
        b = a + 4
        if atype == CTA_TUPLE_IP:
            while b + 4 <= nested_end:
                blen, btype = nla(buf, b)
                if blen < 4:
                    break
                btype &= TYPE_MASK
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
                blen, btype = nla(buf, b)
                if blen < 4:
                    break
                btype &= TYPE_MASK
                if btype == CTA_PROTO_NUM:
                    proto = buf[b + 4]
                elif btype == CTA_PROTO_SRC_PORT:
                    (sport,) = be_u16(buf, b + 4)
                elif btype == CTA_PROTO_DST_PORT:
                    (dport,) = be_u16(buf, b + 4)
                elif btype == CTA_PROTO_ICMP_ID or btype == CTA_PROTO_ICMPV6_ID:
                    (icmp_id,) = be_u16(buf, b + 4)
                elif btype == CTA_PROTO_ICMP_TYPE or btype == CTA_PROTO_ICMPV6_TYPE:
                    icmp_type = buf[b + 4]
                elif btype == CTA_PROTO_ICMP_CODE or btype == CTA_PROTO_ICMPV6_CODE:
                    icmp_code = buf[b + 4]
                b += (blen + 3) & ~3
        a += (alen + 3) & ~3
    return tuple_new(CtTuple, (src, dst, proto, sport, dport, icmp_id, icmp_type, icmp_code))


def read_pair_u64(buf: bytes, a: int, end: int) -> tuple[int | None, int | None]:
    """Attributes 1 and 2 of a nest: (packets, bytes) of CTA_COUNTERS_*, (start, stop) of CTA_TIMESTAMP."""
    if end - a == 24:
        len1, type1, first, len2, type2, second = two_be64(buf, a)
        if (len1, type1, len2, type2) == TWO_BE64_HEADERS:
            return first, second
    first = second = None
    while a + 4 <= end:
        alen, atype = nla(buf, a)
        if alen < 4:
            break
        atype &= TYPE_MASK
        if atype == CTA_COUNTERS_PACKETS:
            (first,) = be_u64(buf, a + 4)
        elif atype == CTA_COUNTERS_BYTES:
            (second,) = be_u64(buf, a + 4)
        elif atype == CTA_COUNTERS32_PACKETS:
            (first,) = be_u32(buf, a + 4)
        elif atype == CTA_COUNTERS32_BYTES:
            (second,) = be_u32(buf, a + 4)
        a += (alen + 3) & ~3
    return first, second


def read_tcp_state(buf: bytes, a: int, end: int) -> int | None:
    while a + 4 <= end:
        alen, atype = nla(buf, a)
        if alen < 4:
            break
        if atype & TYPE_MASK == CTA_PROTOINFO_TCP:
            b, tcp_end = a + 4, a + alen
            while b + 4 <= tcp_end:
                blen, btype = nla(buf, b)
                if blen < 4:
                    break
                if btype & TYPE_MASK == CTA_PROTOINFO_TCP_STATE:
                    return buf[b + 4]
                b += (blen + 3) & ~3
        a += (alen + 3) & ~3
    return None
