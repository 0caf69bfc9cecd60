"""vm.* commands: define VMs from specs, keep their records, and run their power operations as tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec

from edgevm.lifecycle.drivers.domain_xml import build_domain_xml
from edgevm.lifecycle.images import ImageService
from edgevm.lifecycle.network import Attachment, NoNetwork, VmNetwork
from edgevm.lifecycle.paths import confine, is_store_path
from edgevm.lifecycle.planner import Planner, VolumeFile, nic_plans, seed_content
from edgevm.lifecycle.records import VmRecords
from edgevm.lifecycle.seed import write_seed
from edgevm.lifecycle.userdata import validate_meta_data, validate_network_config, validate_user_data
from edgevm.shared import qcow2
from edgevm.shared.clock import now
from edgevm.shared.commands import Empty, StopVm, TaskReply, UpdateVm, VmList, VmRef
from edgevm.shared.errors import Conflict, EdgevmError, InvalidRequest, Unavailable, invalid_from_msgspec
from edgevm.shared.events import VmCrashed, VmCreated, VmDeleted, VmStarted, VmStopped, VmUpdated
from edgevm.shared.layout import Layout
from edgevm.shared.libvirt.blockjobs import BlockJobs
from edgevm.shared.libvirt.connection import HypervisorConnection
from edgevm.shared.libvirt.definitions import Definitions
from edgevm.shared.libvirt.errors import DomainNotFound, OperationInvalid
from edgevm.shared.libvirt.power import Power
from edgevm.shared.libvirt.states import DomainState
from edgevm.shared.locks import VmLocks
from edgevm.shared.objects import Vm, VmState, VmStatus
from edgevm.shared.publisher import EventPublisher
from edgevm.shared.qemuimg import QemuImg
from edgevm.shared.spec import IMMUTABLE_FIELDS, VmSpec
from edgevm.shared.taskrunner import Progress, TaskRunner

log = logging.getLogger(__name__)
POLL = 0.25
LEASE_RECHECK = 0.5
TRANSIENT_AFTER = 0.2  # a step shorter than this never records its `starting` / `stopping` state


class VmService:
    """Owns the node's VMs: records, files, domains and their power state."""

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
        self.network: VmNetwork = network or NoNetwork()
        self._creating: dict[str, VmSpec] = {}
        self.strays: set[str] = set()  # record-less edgevm domains found at reconcile
        self.images = images
        self.power = Power(hypervisor)
        self.definitions = Definitions(hypervisor)
        self.blocks = BlockJobs(hypervisor)
        self.planner = planner
        self.runner = runner
        self.locks = locks
        self.publisher = publisher
        self.host_cpus = host_cpus
        self.host_memory = host_memory
        self.qemu_img = qemu_img or QemuImg()
        self._rechecks: dict[str, asyncio.Task[None]] = {}
        self._missing: list[str] = []  # from reconcile, for recover
        self._restart: list[str] = []

    @property
    def layout(self) -> Layout:
        """The node's lifecycle directories."""
        return self.planner.layout

    # -- checks -------------------------------------------------------------------------------------------
    def check_spec(self, spec: VmSpec) -> dict[str, Path]:
        """Check what the struct alone cannot (images exist, host limits, cloud-init); return source paths."""
        if spec.image not in self.images.images:
            raise InvalidRequest(f"image: no image named {spec.image!r} on node {self.node}", "image")
        if spec.cpu > self.host_cpus:
            raise InvalidRequest(f"cpu: must be at most the host's {self.host_cpus} CPUs, got {spec.cpu}", "cpu")
        if spec.memory_bytes > self.host_memory:
            raise InvalidRequest(
                f"memory: must be at most the host's {self.host_memory} bytes, got {spec.memory_bytes}", "memory"
            )
        paths = {spec.image: self.images.path(spec.image)}
        for i, volume in enumerate(spec.volumes):
            field = f"volumes[{i}].source"
            if volume.source is None:
                continue
            if is_store_path(volume.source):
                paths[volume.source] = confine(volume.source, [self.layout.volumes], field=field)
            elif volume.source in self.images.images:
                image = self.images.images[volume.source]
                if volume.kind == "cdrom" and image.format != "iso":
                    raise InvalidRequest(f"{field}: a cdrom needs an iso image, {volume.source} is {image.format}",
                                         field)
                paths[volume.source] = self.images.path(volume.source)
            else:
                raise InvalidRequest(f"{field}: no image named {volume.source!r} on node {self.node}"
                                     " (a path in the volume store has a '/')", field)
        try:  # the domain plan's own rules (e.g. at most 4 IDE devices)
            self.planner.domain(spec, 1, self.planner.files(spec, self.images.images, paths))
        except ValueError as exc:
            raise InvalidRequest(f"volumes: {exc}", "volumes") from None
        if spec.cloud_init is not None:
            validate_user_data(spec.cloud_init.user_data)
            if spec.cloud_init.network_config:
                validate_network_config(spec.cloud_init.network_config)
            if spec.cloud_init.meta_data:
                validate_meta_data(spec.cloud_init.meta_data)
        return paths

    # -- files and domain ---------------------------------------------------------------------------------
    async def _make_files(self, spec: VmSpec, paths: dict[str, Path], attachment: Attachment) -> list[VolumeFile]:
        vm_dir = self.layout.vm_dir(spec.name)
        vm_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(vm_dir, 0o755)
        files = self.planner.files(spec, self.images.images, paths)
        # The disks and the seed are independent files: make them side by side (qemu-img is a process).
        seed = seed_content(spec, attachment.network_config)
        # Atomic, not fsynced: a crashed process loses nothing written to the page cache, and against power
        # loss the VM record is no safer (JetStream syncs its files every 2 minutes by default), so an
        # fsync here (~2 ms of a create) would buy nothing end to end.
        jobs = [asyncio.to_thread(write_seed, self.planner.seed_path(spec.name), seed, False)]
        for f in files:
            if f.path.exists() or f.create == "none":
                continue
            if f.create == "overlay":
                assert f.backing is not None
                jobs.append(self.qemu_img.create_overlay(f.path, f.backing, f.backing_format))
            elif f.create == "blank":
                assert f.size is not None
                jobs.append(self.qemu_img.create_blank(f.path, f.size))
        await asyncio.gather(*jobs)
        return files

    async def _define(
        self, spec: VmSpec, revision: int, paths: dict[str, Path], attachment: Attachment | None = None
    ) -> list[str]:
        """Make the VM's files and (re)define its domain; return the addresses netplumb gave its NICs."""
        # netplumb first: its answer (NICs, network-config) goes into the domain and the seed, and its
        # refusal (a taken port, an unknown VRF) must come before any file is made.
        if attachment is None:
            attachment = await self.network.prepare(spec)
        files = await self._make_files(spec, paths, attachment)
        plan = self.planner.domain(spec, revision, files, nic_plans(spec, attachment.nics))
        await self.definitions.define(build_domain_xml(plan))
        return [nic.address.split("/")[0] for nic in attachment.nics if nic.address]

    async def _remove_files(self, vm: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self.layout.vm_dir(vm), True)

    # -- records ------------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _transient(self, name: str, state: VmState) -> AsyncIterator[None]:
        """Record `state` (starting, stopping) for the block, but only once it lasts TRANSIENT_AFTER.

        A test-driver start takes a millisecond; a write of `starting` then `running` a millisecond apart
        tells no one anything and costs two bucket writes and two events.
        """
        writing = False

        async def later() -> None:
            nonlocal writing
            await asyncio.sleep(TRANSIENT_AFTER)
            writing = True
            await self._set_state(self.records.get(name), state)

        job = asyncio.create_task(later())
        try:
            yield
        finally:
            if not writing:
                job.cancel()
            await asyncio.gather(job, return_exceptions=True)  # a write under way ends before the next


    async def _set_state(self, vm: Vm, state: VmState, error: str | None = None, event: type | None = None) -> Vm:
        status = msgspec.structs.replace(vm.status, state=state, updated_at=now(),
                                         last_error=error if state == "error" else vm.status.last_error)
        updated = Vm(vm.spec, status)
        await self.records.save(updated)
        await self.publisher.publish((event or VmUpdated)(at=now(), vm=updated))
        return updated

    def users_of_image(self, image: str) -> list[str]:
        """Return the VMs whose spec names `image`, those being created included."""
        specs = [vm.spec for vm in self.records.all()] + list(self._creating.values())
        return [spec.name for spec in specs if spec.image == image or any(v.source == image for v in spec.volumes)]

    # -- commands -----------------------------------------------------------------------------------------
    async def create(self, spec: VmSpec) -> Vm:
        """vm.create: files and domain now; a vm.start task after when auto_start."""
        if self.records.find(spec.name) is not None:
            raise Conflict(f"a VM named {spec.name} exists already", "name")
        paths = self.check_spec(spec)
        # Only this service creates VMs of this node, and nothing acts on a VM before its record exists:
        # an in-process guard keeps two creates of one name apart, without a lease in the bucket.
        if spec.name in self._creating:
            raise Conflict(f"a VM named {spec.name} is being created", "name")
        if spec.name in self.strays or self.layout.vm_dir(spec.name).exists():
            # What a record-less domain or directory holds is not ours to overwrite or to clean up.
            raise Conflict(f"VM {spec.name} has no record but its domain edgevm-{spec.name} or directory"
                           f" {self.layout.vm_dir(spec.name)} is there: remove them by hand first", "name")
        self._creating[spec.name] = spec
        try:
            stamp = now()
            guest_os = self.images.images[spec.image].guest_os
            try:
                addresses = await self._define(spec, 1, paths)
                vm = Vm(spec, VmStatus(state="defined", guest_os=guest_os, revision=1, created_at=stamp,
                                       updated_at=stamp, ip_addresses=addresses))
                await self.records.create(vm)
            except BaseException:
                await self._undo_create(spec.name)
                raise
        finally:
            self._creating.pop(spec.name, None)
        await self.publisher.publish(VmCreated(at=now(), vm=vm))
        if spec.auto_start:
            try:
                await self.start(VmRef(spec.name))
            except EdgevmError as exc:  # the VM exists: say so, and why it did not start
                log.warning("VM %s was created but its auto start was refused: %s", spec.name, exc.message)
        return vm

    async def _undo_create(self, name: str) -> None:
        try:
            await self.network.release(name)
        except Exception as exc:
            log.warning("VM %s: its network allocation could not be released: %s", name, exc)
        try:
            await self.definitions.undefine(name)
        except DomainNotFound:
            pass
        except Exception:
            log.exception("VM %s: the half-made domain could not be removed", name)
        await self._remove_files(name)

    async def get(self, req: VmRef) -> Vm:
        """vm.get: from the records, never from libvirt."""
        return self.records.get(req.name)

    async def list(self, req: Empty) -> VmList:
        """vm.list."""
        return VmList(self.records.all())

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
        paths = self.check_spec(spec)
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
            addresses = await self._define(spec, revision, paths, attachment)
            # A grown disk grows now, live when the VM runs (as Proxmox' resize does); last, as the one
            # step that cannot be taken back.
            for name, size in resizes.items():
                path = self.layout.vm_dir(req.name) / f"volume-{name}.qcow2"
                if running:
                    await self.blocks.resize(req.name, str(path), size)
                else:
                    await self.qemu_img.resize(path, size)
            for name in removed:
                (self.layout.vm_dir(req.name) / f"volume-{name}.qcow2").unlink(missing_ok=True)
            updated = Vm(spec, msgspec.structs.replace(current.status, revision=revision, updated_at=now(),
                                                       ip_addresses=addresses))
            await self.records.save(updated)
        await self.publisher.publish(VmUpdated(at=now(), vm=updated))
        return updated

    async def start(self, req: VmRef) -> TaskReply:
        """vm.start."""
        self.records.get(req.name)
        return TaskReply(await self.runner.submit("vm.start", req.name, lambda p: self._start(req.name, p)))

    async def stop(self, req: StopVm) -> TaskReply:
        """vm.stop: ACPI shutdown, destroyed after stop_timeout; at once with force."""
        self.records.get(req.name)
        return TaskReply(
            await self.runner.submit("vm.stop", req.name, lambda p: self._stop(req.name, req.force, p))
        )

    async def restart(self, req: VmRef) -> TaskReply:
        """vm.restart: a graceful stop, then a start."""
        self.records.get(req.name)

        async def work(progress: Progress) -> dict[str, Any] | None:
            await self._stop(req.name, False, progress)
            return await self._start(req.name, progress)

        return TaskReply(await self.runner.submit("vm.restart", req.name, work))

    async def delete(self, req: VmRef) -> TaskReply:
        """vm.delete: stop it (as vm.stop does) when running, release its network, remove domain and files."""
        self.records.get(req.name)
        return TaskReply(await self.runner.submit("vm.delete", req.name, lambda p: self._delete(req.name, p)))

    # -- task bodies --------------------------------------------------------------------------------------
    async def _start(self, name: str, progress: Progress) -> dict[str, Any] | None:
        await self._repair_files(self.records.get(name))
        await progress(10, "starting the domain")
        failed: Exception | None = None
        async with self._transient(name, "starting"):
            try:
                await self.power.start(name)
            except OperationInvalid as exc:
                if await self._domain_state(name) != DomainState.RUNNING:
                    failed = exc  # else it runs already
            except Exception as exc:
                failed = exc
            # libvirt's create() returns once the domain runs: no need to look again.
        if failed is not None:
            await self._set_state(self.records.get(name), "error", f"start failed: {failed}")
            raise failed
        try:
            await self.network.activate(name)
        except Exception as exc:
            # A VM whose port mappings could not be applied is not what was asked for: take it down again.
            log.warning("VM %s: network not applied, stopping it again: %s", name, exc)
            try:
                await self.power.destroy(name)
            except (OperationInvalid, DomainNotFound):
                pass
            await self._wait_off(name, 10)
            await self._set_state(self.records.get(name), "error", f"its network could not be applied: {exc}")
            raise
        await self._set_state(self.records.get(name), "running", event=VmStarted)
        return None

    async def _stop(self, name: str, force: bool, progress: Progress) -> dict[str, Any] | None:
        vm = self.records.get(name)
        if await self._domain_state(name) in (DomainState.SHUTOFF, DomainState.CRASHED):
            if vm.status.state not in ("stopped", "defined", "crashed"):
                await self._set_state(vm, "stopped", event=VmStopped)
            await self._network_down(name)
            return {"forced": False}
        forced = force
        try:
            async with self._transient(name, "stopping"):
                if not force:
                    await progress(10, "ACPI shutdown sent")
                    try:
                        await self.power.shutdown(name)
                    except OperationInvalid:
                        pass  # it stopped meanwhile
                    forced = not await self._wait_off(name, vm.spec.stop_timeout)
                if forced:
                    await progress(90, "destroying the domain")
                    try:
                        await self.power.destroy(name)  # returns once the domain is off
                    except OperationInvalid:
                        await self._wait_off(name, 10)  # it was stopping by itself
        except Exception:
            # Whatever failed, the record must not stay `stopping`: take what libvirt says.
            with contextlib.suppress(Exception):
                real = await self._domain_state(name)
                state: VmState = "running" if real in (DomainState.RUNNING, DomainState.PAUSED) else "stopped"
                if self.records.get(name).status.state != state:
                    await self._set_state(self.records.get(name), state)
            raise
        await self._set_state(self.records.get(name), "stopped", event=VmStopped)
        await self._network_down(name)
        return {"forced": forced}

    async def _repair_files(self, vm: Vm) -> None:
        """Before a start: make again a seed or a fresh overlay that a power cut left empty or short.

        They are written atomically but not fsynced (see `_make_files`); a file the cut tore is one nothing
        had written to yet, so making it again loses nothing.
        """
        name = vm.spec.name
        seed = self.planner.seed_path(name)
        root = self.layout.vm_dir(name) / "root.qcow2"
        torn = not seed.exists() or seed.stat().st_size == 0
        if self.images.images.get(vm.spec.image) and self.images.images[vm.spec.image].format != "iso":
            if not root.exists():
                torn = True
            elif root.stat().st_size < qcow2.MIN_OVERLAY_SIZE:
                log.warning("VM %s: its overlay %s is torn (%d bytes): making it again", name, root,
                            root.stat().st_size)
                root.unlink()
                torn = True
        if torn:
            log.warning("VM %s: its seed or overlay was missing or torn: defining it again", name)
            await self._define(vm.spec, vm.status.revision, self.check_spec(vm.spec))

    async def _network_down(self, name: str) -> None:
        # The VM is off whatever the network says: a failure here leaves rules that netplumb removes at its
        # next reconcile (it follows edgevm_vms), so it is logged, not raised.
        try:
            await self.network.deactivate(name)
        except Exception as exc:
            log.warning("VM %s is off but its port mappings could not be removed now: %s", name, exc)

    async def _wait_off(self, name: str, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while await self._domain_state(name) not in (DomainState.SHUTOFF, DomainState.CRASHED):
            if loop.time() - start >= timeout:
                return False
            await asyncio.sleep(POLL)
        return True

    async def _delete(self, name: str, progress: Progress) -> dict[str, Any] | None:
        vm = self.records.get(name)
        state = await self._domain_state(name)
        if state not in (DomainState.SHUTOFF, DomainState.CRASHED, None):
            await progress(10, "stopping the VM (ACPI, then killed after its stop_timeout)")
            await self._stop(name, False, progress)
        # Before anything is removed: a netplumb that cannot answer fails the task with the VM intact.
        await progress(50, "releasing its network")
        await self.network.release(name)
        await progress(60, "removing the domain and its files")
        try:
            await self.definitions.undefine(name)
        except DomainNotFound:
            pass
        await self._remove_files(name)
        await self.records.delete(name)
        await self.publisher.publish(VmDeleted(at=now(), vm=msgspec.structs.replace(
            vm, status=msgspec.structs.replace(vm.status, state="stopped", updated_at=now()))))
        return None

    async def _domain_state(self, name: str) -> DomainState | None:
        try:
            return await self.power.state(name)
        except DomainNotFound:
            return None

    # -- what libvirt tells ---------------------------------------------------------------------------------
    async def on_domain_event(self, name: str) -> None:
        """A libvirt lifecycle event for `name`: look at the domain unless one of our tasks is at work on it."""
        if self.runner.holds(name):
            await self.observe(name, None)  # schedules the look for when the task ends
            return
        await self.observe(name, await self._domain_state(name))

    async def observe(self, name: str, state: DomainState | None) -> None:
        """Bring a VM's recorded state in line with its domain's real state (from an event or a resync)."""
        vm = self.records.find(name)
        if vm is None:
            return
        if self.runner.holds(name) or await self.locks.holder(name) is not None:
            # An operation (ours or another service's) holds the VM: look again once it lets go, since a
            # snapshotter's lease records nothing of the VM's power state.
            if name not in self._rechecks:
                job = asyncio.create_task(self._observe_after_lease(name))
                self._rechecks[name] = job
            return
        vm = self.records.find(name)  # again: the awaits above may have let another write in
        if vm is None:
            return
        if state == DomainState.RUNNING and vm.status.state != "running":
            await self._set_state(vm, "running", event=VmStarted)
        elif state == DomainState.SHUTOFF and vm.status.state in ("running", "starting", "stopping"):
            await self._set_state(vm, "stopped", event=VmStopped)
            await self._network_down(name)
        elif state == DomainState.CRASHED and vm.status.state != "crashed":
            await self._set_state(vm, "crashed", event=VmCrashed)
            await self._network_down(name)

    async def _observe_after_lease(self, name: str) -> None:
        # Leases live in JetStream KV, so there is nothing local to wait on: poll until it is released.
        try:
            while True:
                try:
                    if not self.runner.holds(name) and await self.locks.holder(name) is None:
                        break
                except Unavailable as exc:
                    log.warning("VM %s: its lease cannot be read now (%s); looking again", name, exc)
                await asyncio.sleep(LEASE_RECHECK)
        finally:
            # Gone from the table before looking: a lease taken meanwhile schedules a new look.
            self._rechecks.pop(name, None)
        await self.observe(name, await self._domain_state(name))

    async def close(self) -> None:
        """Cancel the pending re-checks (at shutdown)."""
        for job in list(self._rechecks.values()):
            job.cancel()
        await asyncio.gather(*self._rechecks.values(), return_exceptions=True)

    async def reconcile(self) -> list[str]:
        """At start-up, before commands: take real states, report stray domains; return the strays.

        What needs the network (defining a lost domain again, starting auto_start VMs) is left to `recover`,
        which waits for netplumb: it may start after this service.
        """
        domains = {d.vm: d for d in await self.definitions.list()}
        self._missing, self._restart = [], []
        for vm in self.records.all():
            name = vm.spec.name
            # `stopping` was on its way down: a VM someone was stopping is not started again.
            was_up = vm.status.state in ("running", "starting")
            if name not in domains:
                log.warning("VM %s has no domain: it will be defined again from its spec", name)
                self._missing.append(name)
                if vm.status.state in ("running", "starting", "stopping"):
                    await self._set_state(vm, "stopped", event=VmStopped)
                if was_up and vm.spec.auto_start:
                    self._restart.append(name)
                continue
            real = domains[name].state
            wanted: VmState | None = {
                DomainState.RUNNING: "running",
                DomainState.PAUSED: "running",
                DomainState.CRASHED: "crashed",
            }.get(real)
            if wanted is None and real == DomainState.SHUTOFF and vm.status.state not in ("defined", "stopped"):
                wanted = "stopped"
                if was_up and vm.spec.auto_start:
                    self._restart.append(name)
            if wanted is not None and wanted != vm.status.state:
                await self._set_state(vm, wanted)
        self.strays = set(domains) - {vm.spec.name for vm in self.records.all()}
        for stray in sorted(self.strays):
            log.warning("domain edgevm-%s has no VM record on node %s: left alone, remove it by hand", stray,
                        self.node)
        return sorted(self.strays)

    async def recover(self) -> None:
        """After `reconcile`, once the network answers: define lost domains again, start auto_start VMs.

        A VM with `auto_start` that was running when the node went down (its record says so, its domain is
        off now: the host rebooted or libvirt lost it) is started again, as Proxmox' "start at boot" does.
        A VM someone stopped stays stopped.
        """
        await self.network.wait_ready()
        for name in self._missing:
            vm = self.records.find(name)
            if vm is None:
                continue
            try:
                await self._define(vm.spec, vm.status.revision, self.check_spec(vm.spec))
            except Exception as exc:
                log.error("VM %s could not be defined again: %s", name, exc)
                await self._set_state(vm, "error", f"its domain was missing and could not be defined: {exc}")
                with contextlib.suppress(ValueError):
                    self._restart.remove(name)
        for name in self._restart:
            log.info("VM %s (auto_start) was running before the node went down: starting it again", name)
            try:
                await self.start(VmRef(name))
            except Exception as exc:
                log.error("VM %s could not be started again: %s", name, exc)
        self._missing, self._restart = [], []


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
