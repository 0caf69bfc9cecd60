"""Links in a real namespace: a session shares one read of a namespace until something changes it."""

from ipaddress import IPv4Interface

import pytest

from edgevm.netplumb.drivers.links import links_session, open_links

pytestmark = pytest.mark.root


def test_a_session_shares_what_it_read_and_reads_again_after_a_change(node):
    with links_session():
        with open_links(node) as first:
            assert "evh-x" not in first.names()
        with open_links(node) as second:
            second.ensure_bridge("evh-x")
            second.ensure_addresses("evh-x", [IPv4Interface("10.5.0.1/24")])
        with open_links(node) as third:
            assert "evh-x" in third.names(fresh=False), "a change made through the session is seen"
            assert third.kind("evh-x") == "bridge"
            assert third.addresses("evh-x") == {IPv4Interface("10.5.0.1/24")}
    assert first.changes == [] and third.changes == []
    assert second.changes == [f"{node}: created bridge evh-x", f"{node}: added 10.5.0.1/24 to evh-x"]


def test_addresses_are_read_per_namespace_and_told_apart_by_link(lab, node):
    other = lab.netns("other")
    with links_session():
        for netns, address in ((node, "10.5.0.1/24"), (other, "10.6.0.1/24")):
            with open_links(netns) as links:
                links.ensure_bridge("evh-a")
                links.ensure_bridge("evh-b")
                links.ensure_addresses("evh-a", [IPv4Interface(address)])
        with open_links(node) as mine, open_links(other) as theirs:
            assert mine.addresses("evh-a") == {IPv4Interface("10.5.0.1/24")} and mine.addresses("evh-b") == set()
            assert theirs.addresses("evh-a") == {IPv4Interface("10.6.0.1/24")}
