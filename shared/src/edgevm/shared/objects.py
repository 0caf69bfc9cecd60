"""What nodes return: Vm, Image, Task, Snapshot, Flow, Vrf and Vnet (PROTOCOL.md, Objects)."""

from __future__ import annotations

from typing import Any, Literal

from msgspec import Struct

from edgevm.shared.spec import VmSpec

VmState = Literal["defined", "starting", "running", "stopping", "stopped", "crashed", "error"]
TaskStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED_TASK_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class VmStatus(Struct):
    """What the node knows of a VM beyond its spec."""

    state: VmState
    revision: int
    created_at: str
    updated_at: str
    guest_os: str = ""
    ip_addresses: list[str] = []
    last_error: str | None = None


class Vm(Struct):
    """A VM as the node returns it."""

    spec: VmSpec
    status: VmStatus


class Image(Struct):
    """An image in the node's image store."""

    name: str
    format: Literal["qcow2", "raw", "iso"]
    guest_os: str
    size_bytes: int
    sha256: str
    created_at: str


class Task(Struct):
    """A row of "Recent Tasks": one long operation of any service."""

    id: str
    node: str
    kind: str
    status: TaskStatus
    created_at: str
    vm: str | None = None
    progress: int | None = None
    message: str = ""
    error: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    result: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        """Return True once the task can no longer change."""
        return self.status in FINISHED_TASK_STATUSES


class Snapshot(Struct):
    """A snapshot of a VM, a node of the VM's snapshot tree."""

    name: str
    vm: str
    created_at: str
    vm_state: Literal["running", "stopped", "paused"]
    mode: Literal["internal", "external"]
    description: str = ""
    parent: str | None = None
    current: bool = False


class Flow(Struct):
    """A traffic flow of a VM, active or ended."""

    id: str
    node: str
    vm: str
    protocol: str
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    direction: Literal["inbound", "outbound"]
    status: Literal["active", "completed", "terminated"]
    started_at: str
    state: str | None = None
    ended_at: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0


class Vrf(Struct):
    """A VRF: an isolated routing domain for VMs with its subnet and gateway."""

    name: str
    subnet: str
    gateway: str


class Vnet(Struct):
    """A virtual network: an overlay (VXLAN) joining VMs of several nodes."""

    name: str
    cidr: str
    vni: int
    peers: list[str] = []
