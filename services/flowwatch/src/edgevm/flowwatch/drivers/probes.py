"""Probes that make both ends of a cut TCP flow learn at once, even an end that has nothing to send.

Each end gets a bare ACK, from its peer as that end sees it, with sequence numbers outside its window.
TCP answers such a segment with an ACK that carries its real numbers (RFC 793, 5961); that answer meets
flowwatch's cut set, whose reset then carries exactly the sequence number the end expects, and it resets.
The probes bear PROBE_MARK: flowwatch's table neither tracks nor cuts them, so each one goes through the
NAT of other namespaces (a node's port mapping) as a packet of the flow would.
"""

from __future__ import annotations

import os
import socket
import struct

from edgevm.flowwatch.drivers.ctparse import CtTuple
from edgevm.shared.netns import call_in_netns

__all__ = ["PROBE_MARK", "send_probes", "tcp_probe"]

PROBE_MARK = 0x45564D46  # "EVMF"
IP_HDRINCL = 3
SO_MARK = 36
_ACK = 0x10


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def tcp_probe(src: str, sport: int, dst: str, dport: int) -> bytes:
    """An IPv4 packet with a bare TCP ACK whose sequence and acknowledgement numbers are random."""
    seq, ack = struct.unpack("!II", os.urandom(8))
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, _ACK, 1024, 0, 0)
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    checksum = _checksum(s + d + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header)) + header)
    header = header[:16] + struct.pack("!H", checksum) + header[18:]
    # the kernel fills in the IP checksum (and the id when 0) for a raw socket with IP_HDRINCL
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(header), 0, 0x4000, 64, socket.IPPROTO_TCP, 0, s, d)
    return ip + header


def send_probes(
    netns: str | None, orig: CtTuple, reply: CtTuple, initiator: bool = True, responder: bool = True
) -> int:
    """Probe the ends of an IPv4 TCP connection from a namespace whose conntrack entry it is; the number sent.

    The initiator is probed as its peer appears to it (from the original destination), the responder as
    the initiator appears to it (from the reply destination, the address after any SNAT). An end behind
    NAT in another namespace is best probed from there: conntrack there would find the random sequence
    numbers out of its window, call the probe invalid and not translate it.
    """
    if orig.proto != socket.IPPROTO_TCP or ":" in orig.src:
        return 0
    if orig.sport is None or orig.dport is None or reply.sport is None or reply.dport is None:
        return 0
    packets = []
    if initiator:
        packets.append((tcp_probe(orig.dst, orig.dport, orig.src, orig.sport), orig.src))
    if responder:
        packets.append((tcp_probe(reply.dst, reply.dport, reply.src, reply.sport), reply.src))

    def send() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
            sock.setsockopt(socket.IPPROTO_IP, IP_HDRINCL, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, PROBE_MARK)
            sent = 0
            for packet, to in packets:
                try:
                    sock.sendto(packet, (to, 0))
                    sent += 1
                except OSError:  # no route to that end from here: it learns at its next packet
                    pass
            return sent

    return call_in_netns(netns, send)
