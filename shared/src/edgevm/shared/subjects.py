"""Subject names: commands `edgevm.<node>.<area>.<verb>`, events `edgevm.evt.<node>...`, gateway `edgevm.gw.*`."""

from __future__ import annotations

PREFIX = "edgevm"
EVENTS = f"{PREFIX}.evt"
GATEWAY = f"{PREFIX}.gw"
# Completed flows (stream EDGEVM_FLOWS) and snapshot work (a work-queue stream) live outside `edgevm.evt.>`.
FLOW_LOG = f"{PREFIX}.flowlog"
SNAPSHOT_WORK = f"{PREFIX}.work"


def command(node: str, verb: str) -> str:
    """Return the subject of command `verb` (e.g. `vm.create`) on `node`."""
    return f"{PREFIX}.{node}.{verb}"


def event(node: str, tail: str) -> str:
    """Return the event subject `edgevm.evt.<node>.<tail>`."""
    return f"{EVENTS}.{node}.{tail}"


def all_events(node: str = "*") -> str:
    """Return the wildcard that matches every event (of one node, or of all)."""
    return f"{EVENTS}.{node}.>"


def gateway(verb: str) -> str:
    """Return the subject of gateway query `verb` (e.g. `vm.list`)."""
    return f"{GATEWAY}.{verb}"


def flow_log(node: str, vm: str) -> str:
    """Return the subject under which the completed flows of `vm` are kept."""
    return f"{FLOW_LOG}.{node}.{vm}"


def snapshot_work(node: str) -> str:
    """Return the work-queue subject of the node's snapshot tasks."""
    return f"{SNAPSHOT_WORK}.{node}.snapshot"
