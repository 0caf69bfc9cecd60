"""The read model's liveness rule, on clocks the test sets: heartbeat age, replay and clock skew between nodes."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from edgevm.gateway.model import FleetModel
from edgevm.shared.commands import GwVmList
from edgevm.shared.events import Heartbeat, TaskUpdated, VmCreated, VmDeleted, VmUpdated
from edgevm.shared.objects import Task, Vm, VmStatus
from edgevm.shared.spec import VmSpec

START = 1_800_000_000.0  # the gateway's wall clock at the start of each case


class Clocks:
    """The gateway's wall and monotonic clocks, moved together by the test."""

    def __init__(self) -> None:
        self.wall_now, self.mono_now = START, 1000.0

    def wall(self) -> float:
        return self.wall_now

    def monotonic(self) -> float:
        return self.mono_now

    def advance(self, seconds: float) -> None:
        self.wall_now += seconds
        self.mono_now += seconds


def stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def beat(at: float, service: str = "lifecycle") -> Heartbeat:
    return Heartbeat(at=stamp(at), node="n1", services=[service], cpus=2, memory_bytes=1 << 30)


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
def model(clocks: Clocks) -> FleetModel:
    return FleetModel(timeout=30, wall=clocks.wall, monotonic=clocks.monotonic)


def test_a_node_is_up_until_the_timeout_after_its_last_heartbeat(model: FleetModel, clocks: Clocks) -> None:
    model.apply("n1", beat(START))
    clocks.advance(29.9)
    assert model.node_list()[0].state == "up"
    clocks.advance(0.2)
    [info] = model.node_list()
    assert (info.state, info.services, info.last_seen) == ("unreachable", [], stamp(START))


def test_a_replayed_old_heartbeat_does_not_make_a_node_up(model: FleetModel, clocks: Clocks) -> None:
    model.apply("n1", beat(START - 31))
    [info] = model.node_list()
    assert (info.state, info.last_seen) == ("unreachable", stamp(START - 31))


def test_a_replayed_recent_heartbeat_counts_only_for_the_rest_of_its_timeout(
    model: FleetModel, clocks: Clocks
) -> None:
    model.apply("n1", beat(START - 25))
    assert model.node_state("n1") == "up"
    clocks.advance(5.1)
    assert model.node_state("n1") == "unreachable"


def test_a_node_whose_clock_runs_ahead_still_goes_unreachable_after_the_timeout(
    model: FleetModel, clocks: Clocks
) -> None:
    model.apply("n1", beat(START + 600))  # its clock is 10 minutes ahead of the gateway's
    clocks.advance(29.9)
    assert model.node_state("n1") == "up"
    clocks.advance(0.2)
    assert model.node_state("n1") == "unreachable"


def test_a_node_whose_clock_lags_is_judged_by_its_stamps(model: FleetModel, clocks: Clocks) -> None:
    model.apply("n1", beat(START - 5))  # 5 s behind: unreachable 25 s after the beat arrived
    clocks.advance(24.9)
    assert model.node_state("n1") == "up"
    clocks.advance(0.2)
    assert model.node_state("n1") == "unreachable"


def test_services_are_live_each_by_its_own_heartbeat(model: FleetModel, clocks: Clocks) -> None:
    model.apply("n1", beat(START, "lifecycle"))
    clocks.advance(20)
    model.apply("n1", beat(clocks.wall_now, "netplumb"))
    clocks.advance(15)
    [info] = model.node_list()
    assert (info.state, info.services) == ("up", ["netplumb"])


def test_an_older_heartbeat_after_a_newer_one_keeps_last_seen(model: FleetModel, clocks: Clocks) -> None:
    model.apply("n1", beat(START))
    model.apply("n1", beat(START - 3, "netplumb"))
    assert model.node_list()[0].last_seen == stamp(START)


def test_a_node_seen_only_through_other_events_is_unreachable_and_never_seen(model: FleetModel) -> None:
    task = Task("01KBZ0000000000000000000AA", "n2", "vm.start", "running", stamp(START))
    model.apply("n2", TaskUpdated(at=stamp(START), task=task))
    [info] = model.node_list()
    assert (info.node, info.state, info.last_seen) == ("n2", "unreachable", "")
    [row] = model.task_list("n2", None, 10)
    assert (row.id, row.node_state) == (task.id, "unreachable")


def test_the_encoded_vm_list_is_the_vm_list_after_every_change(model: FleetModel, clocks: Clocks) -> None:
    def vm(name: str, revision: int) -> Vm:
        return Vm(VmSpec(name=name, image="img"), VmStatus("running", revision, stamp(START), stamp(START)))

    def same(node: str | None) -> bool:
        return model.vm_list_json(node) == msgspec.json.encode(GwVmList(model.vm_list(node)))

    for node in ("n1", "n2"):
        model.apply(node, beat(START))
        for name in ("b", "a"):
            model.apply(node, VmCreated(at=stamp(START), vm=vm(name, 1)))
    assert same(None) and same("n1") and same("nosuch")
    model.apply("n2", VmUpdated(at=stamp(START), vm=vm("a", 2)))
    model.apply("n1", VmDeleted(at=stamp(START), vm=vm("b", 1)))
    assert same(None) and [v.status.revision for v in model.vm_list("n2")] == [2, 1]
    clocks.advance(31)
    assert same(None) and {v.node_state for v in model.vm_list(None)} == {"unreachable"}
    assert msgspec.json.decode(model.vm_list_json("n1"))["vms"][0]["node_state"] == "unreachable"
    # A VM changes while its node is unreachable, and the node comes back before the next list: no entry keeps
    # the state it was encoded with.
    model.apply("n2", VmUpdated(at=stamp(START + 31), vm=vm("b", 2)))
    model.apply("n2", beat(START + 31))
    assert same(None) and [v.node_state for v in model.vm_list("n2")] == ["up", "up"]
    model.apply("n2", VmCreated(at=stamp(START + 31), vm=vm("c", 1)))
    assert same("n2") and same(None) and len(model.vm_list(None)) == 4
