"""Flowwatch's own nft table: idempotent, untouched by netplumb's table being replaced, cuts that expire."""

from __future__ import annotations

import asyncio
import socket
import subprocess

import pytest

from edgevm.flowwatch.drivers import ctsource, cutoff
from edgevm.flowwatch.drivers.ctparse import CtKind

from .conftest import TcpPair

pytestmark = pytest.mark.root

# netplumb applies its table atomically: one transaction that deletes and writes it again
NETPLUMB_REPLACE = """
add table inet edgevm
delete table inet edgevm
table inet edgevm {
    chain track { type filter hook prerouting priority -150; ct state new counter; }
}
"""


def nft(netns: str, *args: str, stdin: str | None = None) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "nft", *args], input=stdin, capture_output=True, text=True, check=True
    ).stdout


async def test_a_cut_survives_a_refresh_of_our_table_and_a_replacement_of_netplumbs(netns: str) -> None:
    pair = TcpPair(netns)
    try:
        pair.exchange(10, 10)
        client, server = pair.ports
        [entry] = [e for e in ctsource.dump(netns) if e.orig.sport == client]
        await cutoff.ensure_table(netns)
        assert await cutoff.cut(netns, entry._replace(kind=CtKind.UPDATE), seconds=30)
        await cutoff.ensure_table(netns)
        await asyncio.to_thread(nft, netns, "-f", "-", stdin=NETPLUMB_REPLACE)
        await asyncio.to_thread(nft, netns, "-f", "-", stdin=NETPLUMB_REPLACE)
        listed = await asyncio.to_thread(nft, netns, "list", "set", "inet", cutoff.TABLE, "cut4")
        assert f"tcp . 127.0.0.1 . {client} . 127.0.0.1 . {server}" in listed
        assert f"tcp . 127.0.0.1 . {server} . 127.0.0.1 . {client}" in listed

        def reset() -> None:
            pair.client.settimeout(2)
            with pytest.raises(ConnectionResetError):
                pair.client.sendall(b"x")
                pair.client.recv(1)

        await asyncio.to_thread(reset)
    finally:
        pair.close()


def test_cut_elements_cover_both_directions_on_both_sides_of_nat() -> None:
    from edgevm.flowwatch.drivers.ctparse import CtTuple

    orig = CtTuple("172.31.0.9", "10.255.1.1", socket.IPPROTO_TCP, 40000, 8080, None, None, None)
    reply = CtTuple("10.0.0.5", "172.31.0.9", socket.IPPROTO_TCP, 80, 40000, None, None, None)
    assert cutoff.cut_elements(orig, reply) == {
        (6, "172.31.0.9", 40000, "10.255.1.1", 8080),  # client -> host port, before the DNAT
        (6, "172.31.0.9", 40000, "10.0.0.5", 80),  # client -> VM, after it
        (6, "10.0.0.5", 80, "172.31.0.9", 40000),  # VM -> client
    }
    icmp = CtTuple("10.0.0.5", "1.1.1.1", socket.IPPROTO_ICMP, None, None, 7, 8, 0)
    assert cutoff.cut_elements(icmp, icmp) == set()
