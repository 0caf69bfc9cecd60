"""A struct-based parser of ctnetlink messages: conntrack entries from events and table dumps."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

from edgevm.flowwatch.drivers.ctnetlink import (
    CTA_COUNTERS_ORIG,
    CTA_COUNTERS_REPLY,
    CTA_ID,
    CTA_MARK,
    CTA_PROTOINFO,
    CTA_STATUS,
    CTA_TIMESTAMP,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_REPLY,
    CTA_ZONE,
    IPCTNL_MSG_CT_DELETE,
    IPCTNL_MSG_CT_NEW,
    NLM_F_CREATE_EXCL,
    NLMSG_DONE,
    NLMSG_ERROR,
    CtEntry,
    CtKind,
    CtTuple,
    NetlinkError,
)
from edgevm.flowwatch.drivers.cttuple import (
    TYPE_MASK,
    be_u16,
    be_u32,
    nla,
    nlmsghdr,
    read_pair_u64,
    read_tcp_state,
    read_tuple,
    s32,
    tuple_new,
)

__all__ = ["CtEntry", "CtKind", "CtTuple", "NetlinkError", "ends_dump", "parse", "parse_into"]

_RARER_ATTRS = frozenset((CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY, CTA_MARK, CTA_ZONE, CTA_TIMESTAMP))

_NEW, _UPDATE, _DESTROY = CtKind.NEW, CtKind.UPDATE, CtKind.DESTROY


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
        length, mtype, flags = nlmsghdr(buf, off)
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
                (code,) = s32(buf, off + 16)
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
            orig = read_tuple(buf, off + o_at, off + o_end)
            reply = read_tuple(buf, off + r_at, off + r_end)
            if st_at:
                (status,) = be_u32(buf, off + st_at)
            if pi_at:
                tcp_state = read_tcp_state(buf, off + pi_at, off + pi_end)
            if id_at:
                (ct_id,) = be_u32(buf, off + id_at)
            if co_at:
                opkts, obytes = read_pair_u64(buf, off + co_at, off + co_end)
            if cr_at:
                rpkts, rbytes = read_pair_u64(buf, off + cr_at, off + cr_end)
            for atype, at, at_end in rare:
                if atype == CTA_MARK:
                    (mark,) = be_u32(buf, off + at)
                elif atype == CTA_ZONE:
                    (zone,) = be_u16(buf, off + at)
                else:
                    start, stop = read_pair_u64(buf, off + at, off + at_end)
        else:
            seen: list[tuple[int, int, int]] = []  # (raw type, offset, length) of each attribute
            a = off + 20
            while a + 4 <= end:
                alen, atype = nla(buf, a)
                if alen < 4:
                    break
                seen.append((atype, a - off, alen))
                atype &= TYPE_MASK
                if atype <= CTA_PROTOINFO:
                    if atype == CTA_TUPLE_ORIG:
                        orig = read_tuple(buf, a + 4, a + alen)
                    elif atype == CTA_TUPLE_REPLY:
                        reply = read_tuple(buf, a + 4, a + alen)
                    elif atype == CTA_STATUS:
                        (status,) = be_u32(buf, a + 4)
                    elif atype == CTA_PROTOINFO:
                        tcp_state = read_tcp_state(buf, a + 4, a + alen)
                elif atype == CTA_ID:
                    (ct_id,) = be_u32(buf, a + 4)
                elif atype in _RARER_ATTRS:
                    if atype == CTA_COUNTERS_ORIG:
                        opkts, obytes = read_pair_u64(buf, a + 4, a + alen)
                    elif atype == CTA_COUNTERS_REPLY:
                        rpkts, rbytes = read_pair_u64(buf, a + 4, a + alen)
                    elif atype == CTA_MARK:
                        (mark,) = be_u32(buf, a + 4)
                    elif atype == CTA_ZONE:
                        (zone,) = be_u16(buf, a + 4)
                    elif atype == CTA_TIMESTAMP:
                        start, stop = read_pair_u64(buf, a + 4, a + alen)
                a += (alen + 3) & ~3
            if a == end and length not in _message_layouts:
                _learn_layout(length, seen)
        if orig is not None and reply is not None:
            append(
                tuple_new(
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
        atype = raw_type & TYPE_MASK
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
        length, mtype, _ = nlmsghdr(buf, off)
        if length < 16:
            break
        if mtype == NLMSG_DONE:
            return True
        if mtype == NLMSG_ERROR:
            (code,) = s32(buf, off + 16)
            if code:
                raise NetlinkError(-code, os.strerror(-code))
        off = (off + length + 3) & ~3
    return False
