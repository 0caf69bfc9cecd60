"""The ctnetlink vocabulary flowwatch speaks: message and attribute numbers, and conntrack entries as plain
values (what the parser makes and the drivers take)."""

from __future__ import annotations

import enum
from typing import NamedTuple

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


class CtKind(enum.StrEnum):
    """What a conntrack message says happened to its entry."""

    NEW = "new"
    UPDATE = "update"  # also every entry of a table dump
    DESTROY = "destroy"


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
