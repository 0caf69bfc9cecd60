"""vm.* commands: create, read and update VMs, and submit their power operations as tasks."""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from edgevm.lifecycle.images import ImageService
from edgevm.lifecycle.intents import Intents
from edgevm.lifecycle.killhook import with_kill_hook
from edgevm.lifecycle.network import NoNetwork, VmNetwork
from edgevm.lifecycle.planner import Planner
from edgevm.lifecycle.powertasks import PowerTasks
from edgevm.lifecycle.reconcile import Reconciler
from edgevm.lifecycle.records import VmRecords
from edgevm.lifecycle.vmbuild import VmBuilder
from edgevm.lifecycle.vmstate import VmStates
from edgevm.shared.clock import now
from edgevm.shared.commands import StopVm, TaskReply, UpdateVm, VmListRequest, VmRef
from edgevm.shared.errors import Conflict, EdgevmError, InvalidRequest, invalid_from_msgspec
from edgevm.shared.events import VmCreated, VmUpdated
from edgevm.shared.ids import new_id
from edgevm.shared.libvirt.blockjobs import BlockJobs
from edgevm.shared.libvirt.connection import HypervisorConnection
from edgevm.shared.libvirt.definitions import Definitions
from edgevm.shared.libvirt.errors import DomainNotFound
from edgevm.shared.libvirt.power import Power
from edgevm.shared.locks import VmLocks
from edgevm.shared.objects import Vm, VmStatus
from edgevm.shared.paging import Page
from edgevm.shared.publisher import EventPublisher
from edgevm.shared.qemuimg import QemuImg
from edgevm.shared.spec import IMMUTABLE_FIELDS, VmSpec
from edgevm.shared.taskrunner import Progress, TaskRunner, Work

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()


class VmService:
    """The vm.* commands of one node; the work is done by the builder, the power tasks and the reconciler."""

    def __init__(
        self,
        node: str,
        records: VmRecords,
        images: ImageService,
        hypervisor: HypervisorConnection,
        planner: Planner,
        runner: TaskRunner,
        locks: VmLocks,
        publisher: EventPublisher,
        host_cpus: int,
        host_memory: int,
        qemu_img: QemuImg | None = None,
        network: VmNetwork | None = None,
    ) -> None:
        self.node = node
        self.records = records
        self.images = images
        self.runner = runner
        self.locks = locks
        self.publisher = publisher
        self.network: VmNetwork = network or NoNetwork()
        self.blocks = BlockJobs(hypervisor)
        self.builder = VmBuilder(node, images, planner, Definitions(hypervisor), self.network, host_cpus,
                                 host_memory, qemu_img)
        self.states = VmStates(records, publisher)
        self.tasks = PowerTasks(self.states, self.builder, Power(hypervisor), self.network)
        self.reconciler = Reconciler(node, self.tasks, runner, locks, lambda name: self.start(VmRef(name)))
        self._creating: dict[str, VmSpec] = {}
        self.intents = Intents(planner.layout.root / "creating")

    def users_of_image(self, image: str) -> list[str]:
        """Return the VMs whose spec names `image`, those being created included."""
        specs = [vm.spec for vm in self.records.all()] + list(self._creating.values())
        return [spec.name for spec in specs if spec.image == image or any(v.source == image for v in spec.volumes)]

    async def create(self, spec: VmSpec) -> Vm:
        """vm.create: files and domain now; a vm.start task after when auto_start."""
        if self.records.find(spec.name) is not None:
            raise Conflict(f"a VM named {spec.name} exists already", "name")
        paths = self.builder.check_spec(spec)
        # Only this service creates VMs of this node, and nothing acts on a VM before its record exists:
        # an in-process guard keeps two creates of one name apart, without a lease in the bucket.
        if spec.name in self._creating:
            raise Conflict(f"a VM named {spec.name} is being created", "name")
        left = spec.name in self.reconciler.strays or self.builder.layout.vm_dir(spec.name).exists()
        if left and not self.intents.marked(spec.name):
            # What a record-less domain or directory holds is not ours to overwrite or to clean up.
            raise Conflict(f"VM {spec.name} has no record but its domain edgevm-{spec.name} or directory"
                           f" {self.builder.layout.vm_dir(spec.name)} is there: remove them by hand first", "name")
        self._creating[spec.name] = spec
        try:
            if self.intents.marked(spec.name) and not await self._undo_create(spec.name):
                raise Conflict(f"VM {spec.name}: what a create cut by a restart left behind cannot be removed"
                               " yet (netplumb did not answer): try again", "name")
            self.intents.mark(spec.name)  # before netplumb is asked for anything
            stamp = now()
            guest_os = self.images.images[spec.image].guest_os
            try:
                addresses = await self.builder.define(spec, 1, paths)
                vm = Vm(spec, VmStatus(state="defined", guest_os=guest_os, revision=1, created_at=stamp,
                                       updated_at=stamp, ip_addresses=addresses))
                await self.records.create(vm)
            except BaseException:
                await self._undo_create(spec.name)
                raise
            self.intents.clear(spec.name)
        finally:
            self._creating.pop(spec.name, None)
        await self.publisher.publish(VmCreated(at=now(), vm=vm))
        if spec.auto_start:
            try:
                await self.start(VmRef(spec.name))
            except EdgevmError as exc:  # the VM exists: say so, and why it did not start
                log.warning("VM %s was created but its auto start was refused: %s", spec.name, exc.message)
        return vm

    async def _undo_create(self, name: str) -> bool:
        """Remove what a create of `name` made; return whether all is gone (its mark is then cleared)."""
        released = True
        try:
            await self.network.release(name)
        except Exception as exc:
            log.warning("VM %s: its network allocation could not be released: %s", name, exc)
            released = False
        try:
            await self.builder.definitions.undefine(name)
        except DomainNotFound:
            pass
        except Exception:
            log.exception("VM %s: the half-made domain could not be removed", name)
            return False
        await self.builder.remove(name)
        self.reconciler.strays.discard(name)
        if released:
            self.intents.clear(name)
        return released

    async def sweep_cut_creates(self) -> list[str]:
        """At start-up, once netplumb answers: remove what creates cut by the last restart left; return them."""
        swept = []
        for name in self.intents.pending():
            if name in self._creating:
                continue
            if self.records.find(name) is not None:  # the record was written: only the mark was left
                self.intents.clear(name)
                continue
            log.warning("VM %s: its create was cut by the last restart; removing what it left", name)
            if await self._undo_create(name):
                swept.append(name)
        return swept

    async def get(self, req: VmRef) -> Vm:
        """vm.get: from the records, never from libvirt."""
        return self.records.get(req.name)

    async def list(self, req: VmListRequest) -> Page:
        """vm.list: by name; with `limit`, one page after the VM named `after` (which may be gone by now)."""
        rows = ((vm.spec.name, _encoder.encode(vm)) for vm in self.records.after(req.after))
        return Page("vms", rows, req.limit)

    async def update(self, req: UpdateVm) -> Vm:
        """vm.update: against the revision the caller saw; immutable fields stay as they are."""
        vm = self.records.get(req.name)
        if req.revision != vm.status.revision:
            raise Conflict(
                f"VM {req.name} is at revision {vm.status.revision}, not {req.revision}: read it again", "revision"
            )
        changes = req.changes()
        for field in IMMUTABLE_FIELDS:
            if field in changes and changes[field] != getattr(vm.spec, field):
                raise InvalidRequest(f"{field}: is immutable after create; create a new VM instead", field)
        doc = msgspec.to_builtins(vm.spec)
        doc.update({k: msgspec.to_builtins(v) for k, v in changes.items()})
        try:
            spec = msgspec.convert(doc, VmSpec)  # runs every rule of a new spec again
        except msgspec.ValidationError as exc:
            raise invalid_from_msgspec(exc, VmSpec) from None
        if spec == vm.spec:
            return vm
        paths = self.builder.check_spec(spec)
        resizes = volume_resizes(vm.spec, spec)
        async with self.locks.hold(req.name, "vm.update"):
            current = self.records.get(req.name)
            if current.status.revision != req.revision:
                raise Conflict(f"VM {req.name} changed meanwhile (revision {current.status.revision})", "revision")
            running = current.status.state in ("running", "starting", "stopping")
            if running and [v.name for v in spec.volumes] != [v.name for v in vm.spec.volumes]:
                raise Conflict(f"VM {req.name} is running: stop it to add or remove volumes", "volumes")
            if running and (spec.network.vrf != vm.spec.network.vrf
                            or spec.network.virtual_interfaces != vm.spec.network.virtual_interfaces):
                raise Conflict(f"VM {req.name} is running: stop it to change its VRF or virtual interfaces"
                               " (its NICs)", "network")
            removed = {v.name for v in vm.spec.volumes} - {v.name for v in spec.volumes}
            revision = current.status.revision + 1
            # The network first: a refusal there must come before anything changes.
            attachment = await self.network.prepare(spec)
            # Redefining a running domain changes its next boot, as Proxmox' pending changes do.
            addresses = await self.builder.define(spec, revision, paths, attachment)
            # A grown disk grows now, live when the VM runs (as Proxmox' resize does); last, as the one
            # step that cannot be taken back.
            for name, size in resizes.items():
                path = self.builder.layout.vm_dir(req.name) / f"volume-{name}.qcow2"
                if running:
                    await self.blocks.resize(req.name, str(path), size)
                else:
                    await self.builder.qemu_img.resize(path, size)
            for name in removed:
                (self.builder.layout.vm_dir(req.name) / f"volume-{name}.qcow2").unlink(missing_ok=True)
            updated = Vm(spec, msgspec.structs.replace(current.status, revision=revision, updated_at=now(),
                                                       ip_addresses=addresses))
            await self.records.save(updated)
        await self.publisher.publish(VmUpdated(at=now(), vm=updated))
        return updated

    async def start(self, req: VmRef) -> TaskReply:
        """vm.start."""
        self.records.get(req.name)
        return await self._submit("vm.start", req.name, lambda p: self.tasks.start(req.name, p))

    async def stop(self, req: StopVm) -> TaskReply:
        """vm.stop: ACPI shutdown, destroyed after stop_timeout; at once with force (kept for a resume after a
        restart: the Task does not say it)."""
        self.records.get(req.name)
        kept = {"force": True} if req.force else None
        return await self._submit("vm.stop", req.name, lambda p: self.tasks.stop(req.name, req.force, p), kept)

    async def restart(self, req: VmRef) -> TaskReply:
        """vm.restart: a graceful stop, then a start."""
        self.records.get(req.name)

        async def work(progress: Progress) -> dict[str, Any] | None:
            await self.tasks.stop(req.name, False, progress)
            return await self.tasks.start(req.name, progress)

        return await self._submit("vm.restart", req.name, work)

    async def delete(self, req: VmRef) -> TaskReply:
        """vm.delete: stop it (as vm.stop does) when running, release its network, remove domain and files."""
        self.records.get(req.name)
        return await self._submit("vm.delete", req.name, lambda p: self.tasks.delete(req.name, p))

    async def _submit(self, kind: str, name: str, work: Work, request: dict[str, Any] | None = None) -> TaskReply:
        """Submit a task; `request`, what a resume needs that the Task does not carry, is kept first."""
        if request is None:
            return TaskReply(await self.runner.submit(kind, name, with_kill_hook(kind, work)))
        task_id = new_id()
        self.images.requests.keep(task_id, kind, request)
        try:
            return TaskReply(await self.runner.submit(kind, name, with_kill_hook(kind, work), task_id=task_id))
        except BaseException:
            self.images.requests.drop(task_id)
            raise


def volume_resizes(old: VmSpec, new: VmSpec) -> dict[str, int]:
    """Return the blank disks `new` makes larger (name -> bytes); raise 400 for a change that cannot be made.

    A volume keeps what it is: its kind and source cannot change, and a disk cannot shrink (its guest's
    file system would be cut). Remove the volume and add one under a new name instead.
    """
    before = {v.name: v for v in old.volumes}
    grow: dict[str, int] = {}
    for i, volume in enumerate(new.volumes):
        was = before.get(volume.name)
        if was is None:
            continue
        for field in ("kind", "source", "bus"):
            if getattr(volume, field) != getattr(was, field):
                raise InvalidRequest(f"volumes[{i}].{field}: an existing volume's {field} cannot change; remove the"
                                     " volume and add a new one under another name", f"volumes[{i}].{field}")
        if volume.size != was.size:
            if not isinstance(volume.size, int) or not isinstance(was.size, int):
                raise InvalidRequest(f"volumes[{i}].size: only a blank disk (made with a size) can be resized",
                                     f"volumes[{i}].size")
            if volume.size < was.size:
                raise InvalidRequest(f"volumes[{i}].size: a disk cannot shrink (from {was.size} to {volume.size}"
                                     " bytes)", f"volumes[{i}].size")
            grow[volume.name] = volume.size
    return grow
