"""Generation of the edgevm nftables tables from plain rules (pure)."""

from ipaddress import IPv4Address

import pytest

from edgevm.netplumb.drivers.values import PortMappingRule, VirtualIpRule, plan_vrf
from edgevm.netplumb.errors import ConflictError
from edgevm.netplumb.nftjson import batch
from edgevm.netplumb.rulesets import check_port_mappings, node_table, tables, vrf_table

RED = plan_vrf("red", "10.1.0.0/24", uplink="169.254.64.0/31", netns_prefix="edgevm-")
BLUE = plan_vrf("blue", "10.1.0.0/24", uplink="169.254.64.2/31", netns_prefix="edgevm-")
DEFAULT = plan_vrf("default", "10.50.0.0/24")


def pm(protocol, iface, host_port, vm, vm_port, vrf):
    return PortMappingRule(protocol, iface, host_port, IPv4Address(vm), vm_port, vrf)


def chain(table, name):
    return table.by_name()[name].rules


def rule_text(rule):
    return repr(rule)


@pytest.mark.parametrize(
    ("rules", "conflict"),
    [
        ([pm("tcp", "eth0", 80, "10.1.0.5", 80, "red"), pm("udp", "eth0", 80, "10.1.0.6", 80, "blue")], False),
        ([pm("tcp", "eth0", 80, "10.1.0.5", 80, "red"), pm("tcp", "eth1", 80, "10.1.0.6", 80, "blue")], False),
        ([pm("tcp", "eth0", 80, "10.50.0.5", 80, "default"), pm("tcp", "eth1", 80, "10.50.0.6", 80, "default")], False),
        ([pm("tcp", "eth0", 80, "10.1.0.5", 80, "red"), pm("tcp", "eth0", 80, "10.1.0.6", 80, "blue")], True),
        ([pm(None, "eth0", 80, "10.1.0.5", 80, "red"), pm("udp", "eth0", 80, "10.1.0.6", 80, "blue")], True),
        # Inside a VRF the node DNATs every interface to the one uplink address: the port must tell them apart.
        ([pm("tcp", "eth0", 80, "10.1.0.5", 80, "red"), pm("tcp", "eth1", 80, "10.1.0.6", 80, "red")], True),
    ],
)
def test_port_mapping_conflicts(rules, conflict):
    if conflict:
        with pytest.raises(ConflictError):
            check_port_mappings(rules)
    else:
        check_port_mappings(rules)


def test_node_dnats_a_vrf_mapping_to_the_vrf_uplink_keeping_the_port():
    table = node_table([RED, DEFAULT], [pm("tcp", "eth0", 8080, "10.1.0.5", 80, "red")], [])

    (rule,) = chain(table, "dnat")

    assert rule[0]["match"]["right"] == "eth0"
    assert rule[1] == {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}}
    assert rule[2]["match"]["left"] == {"payload": {"protocol": "tcp", "field": "dport"}}
    assert rule[-1] == {"dnat": {"family": "ip", "addr": "169.254.64.1"}}


def test_node_dnats_a_default_vrf_mapping_straight_to_the_vm():
    table = node_table([DEFAULT], [pm("udp", "eth0", 5353, "10.50.0.5", 53, "default")], [])

    (rule,) = chain(table, "dnat")

    assert rule[-1] == {"dnat": {"family": "ip", "addr": "10.50.0.5", "port": 53}}


def test_null_protocol_matches_tcp_and_udp_in_one_rule():
    table = vrf_table(RED, [pm(None, "eth0", 9000, "10.1.0.5", 7000, "red")], [])

    (rule,) = chain(table, "dnat")

    assert rule[0] == {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "evuplink"}}
    assert rule[1]["match"]["right"] == {"set": ["tcp", "udp"]}
    assert rule[2]["match"] == {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 9000}
    assert rule[3] == {"dnat": {"family": "ip", "addr": "10.1.0.5", "port": 7000}}


def test_vrf_table_keeps_only_its_own_rules():
    rules = [pm("tcp", "eth0", 80, "10.1.0.5", 80, "red"), pm("tcp", "eth0", 81, "10.1.0.5", 80, "blue")]

    table = vrf_table(RED, rules, [])

    assert [r[1]["match"]["right"] for r in chain(table, "dnat")] == [80]


def test_virtual_ips_give_1to1_nat_and_outbound_only_when_allowed():
    vips = [
        VirtualIpRule(IPv4Address("10.1.0.5"), IPv4Address("172.16.0.5"), True, "overlay", "red"),
        VirtualIpRule(IPv4Address("10.1.0.6"), IPv4Address("172.16.0.6"), False, "overlay", "red"),
    ]

    table = vrf_table(RED, [], vips)

    dnats = chain(table, "dnat")
    snats = chain(table, "snat")
    forward = [rule_text(r) for r in chain(table, "forward")]
    assert [r[-1] for r in dnats] == [
        {"dnat": {"family": "ip", "addr": "10.1.0.5"}},
        {"dnat": {"family": "ip", "addr": "10.1.0.6"}},
    ]
    assert [r[-1] for r in snats[:2]] == [
        {"snat": {"family": "ip", "addr": "172.16.0.5"}},
        {"snat": {"family": "ip", "addr": "172.16.0.6"}},
    ]
    assert "established" in forward[0]
    allowed = [f for f in forward if "'accept'" in f and "evi-overlay" in f]
    assert len(allowed) == 1 and "10.1.0.5" in allowed[0] and "10.1.0.6" not in allowed[0]
    assert any("evi-*" in f and "'drop'" in f for f in forward)


def test_every_table_hooks_conntrack():
    for table in tables([RED, BLUE, DEFAULT], [], []).values():
        assert any("'ct'" in rule_text(r) for r in chain(table, "track"))


def test_tables_key_each_vrf_namespace_and_the_node():
    assert set(tables([RED, BLUE, DEFAULT], [], [])) == {None, "edgevm-red", "edgevm-blue"}


def test_rules_for_an_unknown_vrf_are_refused():
    with pytest.raises(ConflictError):
        tables([RED], [pm("tcp", "eth0", 80, "10.1.0.5", 80, "green")], [])


def test_batch_replaces_the_whole_table_in_one_transaction():
    commands = batch(node_table([RED], [], []))["nftables"]

    assert [next(iter(c)) for c in commands[:3]] == ["add", "delete", "add"]
    assert all("table" in c[next(iter(c))] for c in commands[:3])
    assert all("chain" in c["add"] or "rule" in c["add"] for c in commands[3:])
