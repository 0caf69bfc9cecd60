"""Request and reply bodies of every command (PROTOCOL.md, Commands)."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

from edgevm.shared.errors import FieldError
from edgevm.shared.limits import MAX_PEERS, excerpt
from edgevm.shared.objects import Flow, Image, Snapshot, Task, Vm, VmStatus, Vnet, Vrf
from edgevm.shared.paging import Paged
from edgevm.shared.spec import (
    NAME_BODY,
    Bus,
    CloudInit,
    Description,
    Firmware,
    ImageRefName,
    Ipv4Address,
    Ipv4Network,
    Name,
    Network,
    Size,
    Spec,
    VmSpec,
    Volumes,
    _size,
)

ImageName = Annotated[str, Meta(pattern=r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?\Z", max_length=63)]
TaskId = Annotated[str, Meta(pattern=r"^[0-9A-Z]{26}\Z")]
Limit = Annotated[int, Meta(ge=1, le=500)]
# The cursor of gw.vm.list, whose order is node then name: `<node>/<vm>`.
NodeVmCursor = Annotated[str, Meta(pattern=rf"^{NAME_BODY}/{NAME_BODY}\Z", max_length=127)]


class Empty(Spec):
    """An empty request or reply: `{}`."""


# Images
class ImportImage(Spec):
    """image.import: copy a file on the node into the image store."""

    name: ImageName
    path: Annotated[str, Meta(min_length=1, max_length=4096)]
    guest_os: Annotated[str, Meta(max_length=64)] = "linux"
    format: Literal["qcow2", "raw", "iso"] | None = None


class ImageRef(Spec):
    """image.get / image.delete."""

    name: ImageName


class ImageList(Struct):
    """Reply of image.list."""

    images: list[Image]


# VMs
class VmRef(Spec):
    """vm.get, vm.start, vm.restart, vm.delete."""

    name: Name


class StopVm(Spec):
    """vm.stop: graceful (ACPI) then killed after stop_timeout, or at once with force."""

    name: Name
    force: bool = False


class UpdateVm(Spec):
    """vm.update: the fields to change, against the revision the caller saw."""

    name: Name
    revision: Annotated[int, Meta(ge=0)]
    image: ImageRefName | UnsetType = UNSET
    firmware: Firmware | UnsetType = UNSET
    device_bus: Bus | UnsetType = UNSET
    description: Description | UnsetType = UNSET
    hostname: str | UnsetType | None = UNSET
    stop_timeout: Annotated[int, Meta(ge=1, le=3600)] | UnsetType = UNSET
    auto_start: bool | UnsetType = UNSET
    cpu: Annotated[int, Meta(ge=1, le=512)] | UnsetType = UNSET
    memory: Size | UnsetType = UNSET
    volumes: Volumes | UnsetType = UNSET
    network: Network | UnsetType = UNSET
    cloud_init: CloudInit | UnsetType | None = UNSET

    def __post_init__(self) -> None:
        if self.memory is not UNSET:
            assert not isinstance(self.memory, UnsetType)
            self.memory = _size("memory", self.memory)

    def changes(self) -> dict[str, Any]:
        """Return the fields the caller set, by name (memory already in bytes)."""
        return {
            f: getattr(self, f)
            for f in self.__struct_fields__
            if f not in ("name", "revision") and getattr(self, f) is not UNSET
        }


class VmListRequest(Paged):
    """vm.list: every VM by name, or a page of `limit` of them after the VM named `after` (gone or not)."""

    after: Name | None = None


class VmList(Struct):
    """Reply of vm.list; `next` (the name of the page's last VM, null on the last page) only when paged."""

    vms: list[Vm]
    next: str | UnsetType | None = UNSET


class TaskReply(Struct):
    """Reply of every command that starts a long operation."""

    task: Task


# Snapshots
class SnapshotCreate(Spec):
    """snapshot.create."""

    vm: Name
    name: Name
    description: Description = ""


class SnapshotRef(Spec):
    """snapshot.restore / snapshot.delete."""

    vm: Name
    name: Name


class SnapshotListRequest(Spec):
    """snapshot.list."""

    vm: Name


class SnapshotList(Struct):
    """Reply of snapshot.list: every snapshot with its parent, a tree."""

    snapshots: list[Snapshot]


# Tasks
class TaskRef(Spec):
    """task.get / task.cancel."""

    id: TaskId


class TaskListRequest(Spec):
    """task.list."""

    vm: Name | None = None
    limit: Limit = 50


class TaskList(Struct):
    """Reply of task.list, newest first."""

    tasks: list[Task]


# Network
class VrfCreate(Spec):
    """net.vrf.create."""

    name: Name
    subnet: Ipv4Network

    def __post_init__(self) -> None:
        try:
            net = ipaddress.IPv4Network(self.subnet, strict=True)
        except ValueError as exc:
            raise FieldError("subnet", f"must be an IPv4 network like 10.10.0.0/24 ({exc})") from None
        if net.prefixlen > 29:
            raise FieldError("subnet", "must hold at least 6 addresses (prefix length <= 29)")


class NameRef(Spec):
    """net.vrf.delete / net.vnet.delete."""

    name: Name


class VrfList(Struct):
    """Reply of net.vrf.list."""

    vrfs: list[Vrf]


class VnetCreate(Spec):
    """net.vnet.create."""

    name: Name
    cidr: Ipv4Network
    vni: Annotated[int, Meta(ge=1, le=16777215)]
    peers: Annotated[list[Ipv4Address], Meta(max_length=MAX_PEERS)] = []

    def __post_init__(self) -> None:
        try:
            ipaddress.IPv4Network(self.cidr, strict=True)
        except ValueError as exc:
            raise FieldError("cidr", f"must be an IPv4 network ({exc})") from None
        for i, peer in enumerate(self.peers):
            try:
                ipaddress.IPv4Address(peer)
            except ValueError:
                raise FieldError(f"peers[{i}]", f"must be an IPv4 address, got {excerpt(peer)}") from None


class VnetList(Struct):
    """Reply of net.vnet.list."""

    vnets: list[Vnet]


class NetStatusRequest(Spec):
    """net.status."""

    vm: Name


class NetStatus(Struct):
    """Reply of net.status: the VM's network as applied on the node."""

    vm: str
    vrf: str
    ip_addresses: list[str]
    port_mappings: list[dict[str, Any]]
    virtual_networks: list[dict[str, Any]]
    virtual_interfaces: list[dict[str, Any]]


# Flows
class FlowListRequest(Spec):
    """flow.list."""

    vm: Name
    status: Literal["active", "completed", "all"] = "all"
    limit: Limit = 100


class FlowList(Struct):
    """Reply of flow.list, newest first."""

    flows: list[Flow]


class FlowTerminate(Spec):
    """flow.terminate."""

    vm: Name
    id: Annotated[str, Meta(min_length=1, max_length=128)]


# Gateway
class GwVmListRequest(Paged):
    """gw.vm.list: ordered by node then name; paged as vm.list, the cursor `after` being `<node>/<vm>`."""

    node: Name | None = None
    after: NodeVmCursor | None = None


class GwTaskListRequest(Spec):
    """gw.task.list."""

    node: Name | None = None
    vm: Name | None = None
    limit: Limit = 50


class GwFlowListRequest(Spec):
    """gw.flow.list."""

    node: Name | None = None
    vm: Name | None = None
    status: Literal["active", "completed", "all"] = "all"
    limit: Limit = 100


NodeState = Literal["up", "unreachable"]


class NodeInfo(Struct):
    """A node as the gateway knows it: `unreachable` once no heartbeat came for the gateway's timeout (30 s)."""

    node: str
    last_seen: str
    vms: int
    state: NodeState
    services: list[str] = []


class NodeList(Struct):
    """Reply of gw.node.list."""

    nodes: list[NodeInfo]


class GwVm(Struct):
    """A VM in the fleet view: a Vm, the node it lives on, and that node's state (its last known VM if unreachable)."""

    node: str
    spec: VmSpec
    status: VmStatus
    node_state: NodeState = "up"


class GwVmList(Struct):
    """Reply of gw.vm.list; `next` (`<node>/<vm>` of the page's last VM, null on the last page) only when paged."""

    vms: list[GwVm]
    next: str | UnsetType | None = UNSET


class GwTask(Task, kw_only=True):
    """A Task in the fleet view, with the state of its node."""

    node_state: NodeState = "up"


class GwTaskList(Struct):
    """Reply of gw.task.list, newest first."""

    tasks: list[GwTask]


class GwFlow(Flow, kw_only=True):
    """A Flow in the fleet view, with the state of its node."""

    node_state: NodeState = "up"


class GwFlowList(Struct):
    """Reply of gw.flow.list, newest first."""

    flows: list[GwFlow]


__all__ = [
    "Empty",
    "FlowList",
    "FlowListRequest",
    "FlowTerminate",
    "GwFlow",
    "GwFlowList",
    "GwFlowListRequest",
    "GwTask",
    "GwTaskList",
    "GwTaskListRequest",
    "GwVm",
    "GwVmList",
    "GwVmListRequest",
    "ImageList",
    "ImageRef",
    "ImportImage",
    "NameRef",
    "NetStatus",
    "NetStatusRequest",
    "NodeInfo",
    "NodeList",
    "NodeState",
    "SnapshotCreate",
    "SnapshotList",
    "SnapshotListRequest",
    "SnapshotRef",
    "StopVm",
    "TaskList",
    "TaskListRequest",
    "TaskRef",
    "TaskReply",
    "UpdateVm",
    "VmList",
    "VmListRequest",
    "VmRef",
    "VnetCreate",
    "VnetList",
    "VrfCreate",
    "VrfList",
]
