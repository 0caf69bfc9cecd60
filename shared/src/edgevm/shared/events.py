"""Events published on `edgevm.evt.<node>.<kind>.<id>`: a tagged union on the `type` field."""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Struct

from edgevm.shared.objects import Flow, Task, Vm


class Event(Struct, tag_field="type", kw_only=True):
    """Base of every event: `type` names it, `at` is when it happened (RFC 3339 UTC)."""

    at: str


class VmEvent(Event):
    """Something happened to a VM; carries the VM as it is now."""

    vm: Vm


class VmCreated(VmEvent, tag="vm.created"):
    """A VM was defined."""


class VmUpdated(VmEvent, tag="vm.updated"):
    """A VM's spec or status changed."""


class VmDeleted(VmEvent, tag="vm.deleted"):
    """A VM is gone."""


class VmStarted(VmEvent, tag="vm.started"):
    """A VM started running."""


class VmStopped(VmEvent, tag="vm.stopped"):
    """A VM stopped (by a command or by itself)."""


class VmCrashed(VmEvent, tag="vm.crashed"):
    """A VM's guest crashed."""


class TaskUpdated(Event, tag="task.updated"):
    """A task changed status (or progress)."""

    task: Task


class FlowEvent(Event):
    """Something happened to a flow."""

    flow: Flow


class FlowOpened(FlowEvent, tag="flow.opened"):
    """A flow started."""


class FlowClosed(FlowEvent, tag="flow.closed"):
    """A flow ended by itself."""


class FlowTerminated(FlowEvent, tag="flow.terminated"):
    """A flow was cut by flow.terminate."""


class NetEvent(Event):
    """netplumb applied (or failed to apply) a VM's network."""

    vm: str
    detail: Any = None


class NetApplied(NetEvent, tag="net.applied"):
    """A VM's network is applied as its spec says."""


class NetFailed(NetEvent, tag="net.failed"):
    """A VM's network could not be applied; detail says why."""


class Heartbeat(Event, tag="node.heartbeat"):
    """A service of a node is alive; the gateway merges them into the node's service list."""

    node: str
    services: list[str]
    cpus: int
    memory_bytes: int


AnyEvent = (
    VmCreated
    | VmUpdated
    | VmDeleted
    | VmStarted
    | VmStopped
    | VmCrashed
    | TaskUpdated
    | FlowOpened
    | FlowClosed
    | FlowTerminated
    | NetApplied
    | NetFailed
    | Heartbeat
)

_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)


def decode_event(data: bytes) -> AnyEvent:
    """Decode an event body; raise msgspec.ValidationError when it is not a known event."""
    event: AnyEvent = _decoder.decode(data)
    return event


def event_subject_tail(event: Event) -> str:
    """Return `<kind>.<id>` for an event: the part of its subject after `edgevm.evt.<node>.`."""
    if isinstance(event, VmEvent):
        return f"vm.{event.vm.spec.name}"
    if isinstance(event, TaskUpdated):
        return f"task.{event.task.id}"
    if isinstance(event, FlowEvent):
        return f"flow.{event.flow.vm}"
    if isinstance(event, NetEvent):
        return f"net.{event.vm}"
    if isinstance(event, Heartbeat):
        return "node.heartbeat"
    raise TypeError(f"no subject for {type(event).__name__}")
