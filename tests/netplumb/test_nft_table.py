"""The edgevm nftables table in a real namespace: atomic apply, exact read-back, no-op reconcile."""

import json
import subprocess
from ipaddress import IPv4Address

import pytest

from edgevm.netplumb.drivers import nft
from edgevm.netplumb.drivers.netns import run_all
from edgevm.netplumb.drivers.values import PortMappingRule, VirtualIpRule
from edgevm.netplumb.errors import KernelError
from edgevm.netplumb.nftjson import Chain, Table, dnat, match, meta, payload
from edgevm.netplumb.rulesets import FAMILY, TABLE, tables

pytestmark = pytest.mark.root


def ruleset(netns: str) -> dict:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-j", "list", "ruleset"], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)


def without_handles(value):
    if isinstance(value, dict):
        return {k: without_handles(v) for k, v in value.items() if k != "handle"}
    if isinstance(value, list):
        return [without_handles(v) for v in value]
    return value


@pytest.fixture
def everything(lab, node):
    """Tables using every kind of rule netplumb writes, for a node and one VRF namespace."""
    red = lab.vrf(node, "red", "10.1.0.0/24")
    default = lab.vrf(node, "default", "10.50.0.0/24")
    port_mappings = [
        PortMappingRule("tcp", "lan0", 8080, IPv4Address("10.1.0.5"), 80, "red"),
        PortMappingRule("udp", "lan0", 5353, IPv4Address("10.1.0.5"), 53, "red"),
        PortMappingRule(None, "lan1", 9000, IPv4Address("10.1.0.6"), 9000, "red"),
        PortMappingRule(None, "lan0", 8082, IPv4Address("10.50.0.5"), 80, "default"),
    ]
    virtual_ips = [
        VirtualIpRule(IPv4Address(f"10.1.0.{n}"), IPv4Address(f"172.16.0.{n}"), n % 2 == 0, "vnet-a", "red")
        for n in (5, 6, 9, 10, 100)
    ] + [VirtualIpRule(IPv4Address("10.50.0.5"), IPv4Address("172.16.1.5"), True, "vnet-b", "default")]
    lab.netns("node-red")
    return {netns or node: table for netns, table in tables([red, default], port_mappings, virtual_ips).items()}


def test_every_rule_kind_reads_back_equal_to_what_was_applied(everything):
    for netns, table in everything.items():
        nft.apply_table(table, netns)

        assert nft.read_table(FAMILY, TABLE, netns) == table


def test_a_no_change_reconcile_does_nothing(everything):
    for netns, table in everything.items():
        assert nft.ensure_table(table, netns) is True
        before = ruleset(netns)

        assert nft.ensure_table(table, netns) is False
        assert ruleset(netns) == before, "not even rule handles change"


def test_applying_the_same_table_twice_leaves_the_same_ruleset(everything):
    for netns, table in everything.items():
        nft.apply_table(table, netns)
        before = ruleset(netns)

        nft.apply_table(table, netns)

        assert without_handles(ruleset(netns)) == without_handles(before)


def test_a_failing_apply_leaves_the_previous_table_whole(node):
    good = Table(
        FAMILY,
        TABLE,
        (
            Chain(
                "dnat",
                "nat",
                "prerouting",
                -100,
                (
                    (
                        match(meta("iifname"), "lan0"),
                        match(payload("tcp", "dport"), 80),
                        dnat(IPv4Address("10.0.0.5"), 80),
                    ),
                ),
            ),
        ),
    )
    nft.apply_table(good, node)
    bad_rule = (match(meta("iifname"), "lan0"), {"dnat": {"family": "ip", "addr": "not-an-address"}})  # nft refuses it
    bad = Table(FAMILY, TABLE, (Chain("dnat", "nat", "prerouting", -100, (good.chains[0].rules[0], bad_rule)),))

    with pytest.raises(KernelError):
        nft.apply_table(bad, node)

    assert nft.read_table(FAMILY, TABLE, node) == good


def test_read_and_remove_a_missing_table(node):
    assert nft.read_table(FAMILY, TABLE, node) is None
    assert nft.remove_table(FAMILY, TABLE, node) is False


def test_remove_table_deletes_only_ours(node):
    subprocess.run(["ip", "netns", "exec", node, "nft", "add", "table", "inet", "other"], check=True)
    nft.apply_table(Table(FAMILY, TABLE, ()), node)

    assert nft.remove_table(FAMILY, TABLE, node) is True
    assert nft.read_table(FAMILY, TABLE, node) is None
    assert nft.read_table("inet", "other", node) is not None


def test_tables_of_many_namespaces_are_read_at_once_each_from_its_own(lab, node):
    other = lab.netns("other")
    table = Table(FAMILY, TABLE, (Chain("input", "filter", "input", 0, ()),))
    nft.apply_table(table, node)

    assert nft.read_tables(FAMILY, TABLE, [node, other, f"{lab.prefix}nosuch"])[:2] == [table, None]
    assert isinstance(nft.read_tables(FAMILY, TABLE, [f"{lab.prefix}nosuch"])[0], KernelError)
    assert nft.ensure_tables([(table, node), (table, other)]) == [False, True]


def test_commands_run_side_by_side_each_in_its_namespace(lab, node):
    other = lab.netns("other")
    nft.apply_table(Table(FAMILY, TABLE, ()), node)
    listing = ["nft", "-j", "list", "tables"]

    results = run_all([(listing, node), (listing, other), (["false"], node)])

    assert '"edgevm"' in results[0] and '"edgevm"' not in results[1]
    assert isinstance(results[2], KernelError)
