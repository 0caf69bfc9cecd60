"""Attribution and the active flow table, from conntrack entries built by hand (no kernel needed)."""

from __future__ import annotations

import socket
import sys
import tracemalloc

import pytest

from edgevm.flowwatch.addresses import AddressMap
from edgevm.flowwatch.drivers.ctparse import CtEntry, CtKind, CtTuple
from edgevm.flowwatch.flowtable import ActiveFlow, Changes, NamespaceFlows, flow_id, flow_key
from edgevm.shared.netstate import NicRecord, VmNetRecord, VnetAttachment

TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP
ESTABLISHED, TIME_WAIT = 3, 7


def t(src: str, sport: int, dst: str, dport: int, proto: int = TCP) -> CtTuple:
    return CtTuple(src, dst, proto, sport, dport, None, None, None)


def entry(
    kind: CtKind, orig: CtTuple, reply: CtTuple, tcp_state: int | None = ESTABLISHED, ct_id: int = 1,
    counters: tuple[int, int, int, int] | None = None, start: int | None = None, stop: int | None = None,
) -> CtEntry:
    op, ob, rp, rb = counters or (None, None, None, None)
    return CtEntry(kind, socket.AF_INET, orig, reply, 0, tcp_state, 0, 0, ct_id, op, ob, rp, rb, start, stop)


def vm_record(vm: str, netns: str | None, address: str, vip: str | None = None) -> VmNetRecord:
    return VmNetRecord(
        vm=vm, vrf="v", netns=netns,
        nics=[NicRecord(index=0, mac="52:54:00:00:00:01", address=f"{address}/24", gateway="10.0.0.1", bridge="b",
                        tap="t")],
        virtual_networks=[VnetAttachment(network="n", virtual_ip=vip)] if vip else [],
        updated_at="2026-01-01T00:00:00Z",
    )


@pytest.fixture
def amap() -> AddressMap:
    amap = AddressMap()
    amap.put_vm(vm_record("web", "ns-a", "10.0.0.5", vip="192.168.50.5"))
    amap.put_vm(vm_record("db", "ns-a", "10.0.0.6"))
    amap.put_vm(vm_record("twin", "ns-b", "10.0.0.5"))
    return amap


def table(amap: AddressMap, netns: str) -> NamespaceFlows:
    return NamespaceFlows(netns, amap.addresses(netns))


def apply(flows: NamespaceFlows, *entries: CtEntry) -> Changes:
    changes = Changes()
    flows.apply(list(entries), changes)
    return changes


# the client 172.31.0.9 reaches the VM through the VRF's uplink address and a DNAT
DNAT_ORIG = t("172.31.0.9", 40000, "10.255.1.1", 8080)
DNAT_REPLY = t("10.0.0.5", 80, "172.31.0.9", 40000)
OUT_ORIG = t("10.0.0.5", 50000, "1.1.1.1", 443)
OUT_REPLY = t("1.1.1.1", 443, "10.255.1.1", 50000)  # masqueraded to the uplink


@pytest.mark.parametrize(
    ("orig", "reply", "vm", "direction", "src", "dst"),
    [
        (DNAT_ORIG, DNAT_REPLY, "web", "inbound", ("172.31.0.9", 40000), ("10.0.0.5", 80)),
        (OUT_ORIG, OUT_REPLY, "web", "outbound", ("10.0.0.5", 50000), ("1.1.1.1", 443)),
        # the virtual IP, 1:1 NATed: the reply comes from the VM's own address
        (t("192.168.50.9", 1000, "192.168.50.5", 22), t("10.0.0.5", 22, "192.168.50.9", 1000), "web", "inbound",
         ("192.168.50.9", 1000), ("10.0.0.5", 22)),
        # to the virtual IP with no NAT applied (yet): still the VM's
        (t("192.168.50.9", 1001, "192.168.50.5", 22), t("192.168.50.5", 22, "192.168.50.9", 1001), "web", "inbound",
         ("192.168.50.9", 1001), ("192.168.50.5", 22)),
    ],
)
def test_a_new_entry_is_attributed_with_its_direction_and_ends(
    amap: AddressMap, orig: CtTuple, reply: CtTuple, vm: str, direction: str, src: tuple, dst: tuple
) -> None:
    flows = table(amap, "ns-a")
    changes = apply(flows, entry(CtKind.NEW, orig, reply))
    [opened] = changes.opened
    flow = opened.to_flow("n1", "active")
    assert (flow.vm, flow.direction, flow.status, flow.protocol) == (vm, direction, "active", "tcp")
    assert ((flow.src_ip, flow.src_port), (flow.dst_ip, flow.dst_port)) == (src, dst)


def test_equal_addresses_in_two_namespaces_belong_to_their_own_vm(amap: AddressMap) -> None:
    a, b = table(amap, "ns-a"), table(amap, "ns-b")
    [in_a] = apply(a, entry(CtKind.NEW, DNAT_ORIG, DNAT_REPLY)).opened
    [in_b] = apply(b, entry(CtKind.NEW, DNAT_ORIG, DNAT_REPLY)).opened
    assert (in_a.vm, in_b.vm) == ("web", "twin")
    assert in_a.id != in_b.id
    # and the node namespace, which has no VM of its own here, keeps nothing of it
    assert apply(table(amap, None), entry(CtKind.NEW, DNAT_ORIG, DNAT_REPLY)).opened == []  # type: ignore[arg-type]


def test_a_flow_between_two_vms_is_a_flow_of_each(amap: AddressMap) -> None:
    flows = table(amap, "ns-a")
    changes = apply(flows, entry(CtKind.NEW, t("10.0.0.6", 3000, "10.0.0.5", 5432), t("10.0.0.5", 5432, "10.0.0.6", 3000)))
    assert sorted((f.vm, f.outbound) for f in changes.opened) == [("db", True), ("web", False)]
    assert len({f.id for f in changes.opened}) == 2
    closed = apply(flows, entry(CtKind.DESTROY, t("10.0.0.6", 3000, "10.0.0.5", 5432), t("10.0.0.5", 5432, "10.0.0.6", 3000)))
    assert len(closed.closed) == 2 and len(flows) == 0


def test_unknown_addresses_and_unknown_destroys_are_ignored(amap: AddressMap) -> None:
    flows = table(amap, "ns-a")
    stranger = (t("1.2.3.4", 1, "5.6.7.8", 2), t("5.6.7.8", 2, "1.2.3.4", 1))
    assert not apply(flows, entry(CtKind.NEW, *stranger), entry(CtKind.DESTROY, *stranger))
    assert len(flows) == 0


def test_destroy_carries_the_counters_and_the_end_time(amap: AddressMap) -> None:
    flows = table(amap, "ns-a")
    [opened] = apply(flows, entry(CtKind.NEW, DNAT_ORIG, DNAT_REPLY)).opened
    end = 1_700_000_000_123_000_000
    changes = apply(flows, entry(CtKind.DESTROY, DNAT_ORIG, DNAT_REPLY, counters=(5, 900, 4, 300), stop=end))
    [(flow, ended)] = changes.closed
    record = flow.to_flow("n1", "completed", ended)
    assert flow is opened and ended == end
    assert (record.bytes_in, record.bytes_out, record.packets_in, record.packets_out) == (900, 300, 5, 4)
    assert record.ended_at == "2023-11-14T22:13:20.123Z"


def test_a_tcp_flow_in_time_wait_is_closing_and_not_reopened_by_later_updates(amap: AddressMap) -> None:
    flows = table(amap, "ns-a")
    apply(flows, entry(CtKind.NEW, OUT_ORIG, OUT_REPLY, tcp_state=1))
    changes = apply(flows, entry(CtKind.UPDATE, OUT_ORIG, OUT_REPLY, tcp_state=TIME_WAIT))
    assert [f.vm for f in changes.closing] == ["web"] and len(flows) == 0
    assert not apply(flows, entry(CtKind.UPDATE, OUT_ORIG, OUT_REPLY, tcp_state=TIME_WAIT))
    assert not apply(flows, entry(CtKind.DESTROY, OUT_ORIG, OUT_REPLY, tcp_state=TIME_WAIT))


def test_a_resync_opens_the_missing_closes_the_gone_and_keeps_the_rest(amap: AddressMap) -> None:
    flows = table(amap, "ns-a")
    [kept] = apply(flows, entry(CtKind.NEW, DNAT_ORIG, DNAT_REPLY)).opened
    [gone] = apply(flows, entry(CtKind.NEW, OUT_ORIG, OUT_REPLY)).opened
    newer = (t("10.0.0.5", 50001, "1.1.1.1", 443), t("1.1.1.1", 443, "10.255.1.1", 50001))
    changes = Changes()
    flows.resync(
        [entry(CtKind.UPDATE, DNAT_ORIG, DNAT_REPLY, counters=(9, 9000, 8, 800)),
         entry(CtKind.UPDATE, *newer, start=1_700_000_000_000_000_000)],
        changes,
    )
    assert [f.orig for f in changes.opened] == [newer[0]]
    assert [f for f, _ in changes.closed] == [gone]
    assert sorted(f.id for f in flows.flows()) == sorted([kept.id, changes.opened[0].id])
    assert kept.entry.orig_bytes == 9000  # the kept flow took the dump's counters, and kept its id


def test_an_address_that_changes_hands_moves_its_flows_at_the_next_resync(amap: AddressMap) -> None:
    flows = table(amap, "ns-a")
    [old] = apply(flows, entry(CtKind.NEW, OUT_ORIG, OUT_REPLY)).opened
    amap.remove_vm("web")
    amap.put_vm(vm_record("web2", "ns-a", "10.0.0.5"))
    changes = Changes()
    flows.resync([entry(CtKind.UPDATE, OUT_ORIG, OUT_REPLY)], changes)
    assert [f for f, _ in changes.closed] == [old]
    assert [f.vm for f in changes.opened] == ["web2"]


def test_flow_ids_sort_by_start_and_differ_by_namespace_id_and_side() -> None:
    early = flow_id("ns-a", 7, OUT_ORIG, True, 1_000_000_000)
    late = flow_id("ns-a", 7, OUT_ORIG, True, 2_000_000_000)
    assert early < late
    others = {flow_id("ns-b", 7, OUT_ORIG, True, 1_000_000_000), flow_id("ns-a", 8, OUT_ORIG, True, 1_000_000_000),
              flow_id("ns-a", 7, OUT_ORIG, False, 1_000_000_000)}
    assert early not in others and len(others) == 3


def test_an_active_flow_takes_well_under_a_kilobyte(amap: AddressMap) -> None:
    flows = table(amap, "ns-a")
    addresses = amap.addresses("ns-a")
    for n in range(2000):
        addresses[f"10.1.{n // 250}.{n % 250}"] = "web"
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    batch = [
        entry(CtKind.NEW, t(f"10.1.{n // 250}.{n % 250}", 30000 + n, "8.8.8.8", 53, UDP),
              t("8.8.8.8", 53, "10.255.1.1", 30000 + n, UDP), tcp_state=None, ct_id=n)
        for n in range(2000)
    ]
    for flow in apply(flows, *batch).opened:
        assert flow.id  # the service makes (and keeps) the id of every flow it announces: it counts too
    del batch  # the entries go; the tuples the flows keep from them stay, and count
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    per_flow = sum(s.size_diff for s in after.compare_to(before, "filename")) / len(flows)
    assert len(flows) == 2000
    print(f"{per_flow:.0f} bytes per active flow")
    assert per_flow < 1024, per_flow
    assert sys.getsizeof(next(iter(flows.flows()))) < 200
    assert isinstance(next(iter(flows.flows())), ActiveFlow)


def test_a_taken_flows_tuple_opens_no_flow_until_released_even_after_its_destroy(amap: AddressMap) -> None:
    """The DESTROY that terminating causes must not end the hold: an ICMP echo makes the same tuple again."""
    flows = table(amap, "ns-a")
    [flow] = apply(flows, entry(CtKind.NEW, OUT_ORIG, OUT_REPLY)).opened
    flows.take(flow)
    assert not apply(flows, entry(CtKind.DESTROY, OUT_ORIG, OUT_REPLY), entry(CtKind.NEW, OUT_ORIG, OUT_REPLY, ct_id=2))
    assert len(flows) == 0
    flows.release(flow, restore=False)
    [again] = apply(flows, entry(CtKind.NEW, OUT_ORIG, OUT_REPLY, ct_id=3)).opened
    assert again is not flow and again.entry.id == 3


def test_counters_of_another_connection_on_the_same_tuple_are_not_taken(amap: AddressMap) -> None:
    flows = table(amap, "ns-a")
    [flow] = apply(flows, entry(CtKind.NEW, OUT_ORIG, OUT_REPLY, ct_id=1)).opened
    assert not flow.count(entry(CtKind.UPDATE, OUT_ORIG, OUT_REPLY, ct_id=2, counters=(1, 99, 1, 99)))
    assert flow.entry.orig_bytes is None and flow.entry.id == 1
    assert flow.count(entry(CtKind.UPDATE, OUT_ORIG, OUT_REPLY, ct_id=1, counters=(1, 50, 1, 60)))
    # a resync that finds the tuple used by another connection ends the old flow and opens the new one
    changes = Changes()
    flows.resync([entry(CtKind.UPDATE, OUT_ORIG, OUT_REPLY, ct_id=2, counters=(1, 99, 1, 99))], changes)
    assert [f for f, _ in changes.closed] == [flow] and flow.entry.orig_bytes == 50
    assert [f.entry.id for f in changes.opened] == [2]


def test_a_resync_for_addresses_keeps_a_flow_missing_from_the_dump_for_its_destroy(amap: AddressMap) -> None:
    flows = table(amap, "ns-a")
    [flow] = apply(flows, entry(CtKind.NEW, OUT_ORIG, OUT_REPLY)).opened
    changes = Changes()
    flows.resync([], changes, keep_absent=True)
    assert not changes and len(flows) == 1
    done = apply(flows, entry(CtKind.DESTROY, OUT_ORIG, OUT_REPLY, counters=(5, 900, 4, 300), stop=7))
    assert done.closed == [(flow, 7)] and flow.entry.orig_bytes == 900  # its final counters
    # after a loss (keep_absent False) a missing flow ends at once
    [other] = apply(flows, entry(CtKind.NEW, DNAT_ORIG, DNAT_REPLY)).opened
    changes = Changes()
    flows.resync([], changes, now_ns=11)
    assert changes.closed == [(other, 11)]


def test_the_first_resync_gives_remembered_flows_their_ids_back_and_reports_the_missing(amap: AddressMap) -> None:
    flows = table(amap, "ns-a")
    remembered_id = "0000000001a" + "f" * 16
    flows.remembered = {
        flow_key("ns-a", 1, OUT_ORIG, True): (remembered_id, 26_000_000),  # the id holds its start (ms)
        flow_key("ns-a", 1, DNAT_ORIG, False): ("gone", 2_000_000),
    }
    changes = Changes()
    flows.resync([entry(CtKind.UPDATE, OUT_ORIG, OUT_REPLY)], changes)
    [flow] = flows.flows()
    assert (flow.id, flow.start_ns) == (remembered_id, 26_000_000)
    assert changes.opened == []  # announced by the last run already
    assert changes.forgotten == [flow_key("ns-a", 1, DNAT_ORIG, False)]
    assert flows.find(remembered_id) is flow and flows.find("nonsense") is None
