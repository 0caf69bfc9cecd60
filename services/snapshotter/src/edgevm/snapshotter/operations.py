"""What each snapshot task does to libvirt and the VM's files: internal (bios) and external (uefi) modes.

Every operation is written to be run again after an interruption: it first looks at libvirt's real state
(the snapshot metadata, the domain's definition, the image headers) and does only what is still missing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from edgevm.shared.errors import Conflict, Internal, NotFound, Unprocessable
from edgevm.shared.layout import write_atomically
from edgevm.shared.libvirt.errors import HypervisorError, HypervisorTimeout, HypervisorUnavailable
from edgevm.shared.libvirt.snapshots import SnapshotInfo, Snapshots
from edgevm.shared.objects import Snapshot
from edgevm.shared.qemuimg import QemuImg
from edgevm.shared.taskrunner import Progress
from edgevm.snapshotter.drivers.domains import Domains, RootDisk
from edgevm.snapshotter.layers import VmFiles, frozen_name

log = logging.getLogger(__name__)
_VM_STATES = {"running": "running", "paused": "paused", "disk-snapshot": "running"}


def to_snapshot(vm: str, info: SnapshotInfo) -> Snapshot:
    """The protocol's Snapshot for libvirt's record of it."""
    return Snapshot(
        name=info.name, vm=vm, created_at=info.created_at,
        vm_state=_VM_STATES.get(info.state, "stopped"),  # type: ignore[arg-type]
        mode="external" if info.external else "internal",
        description=info.description, parent=info.parent, current=info.current,
    )


def _same(a: Path | str | None, b: Path | str | None) -> bool:
    """Whether two paths name the same directory entry (links and `..` resolved); the hard links of
    create_external are different names of one file on purpose, so this is not os.path.samefile."""
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def _taken_since(info: SnapshotInfo, since: str) -> bool:
    """Whether libvirt's snapshot was taken at or after `since` (a task's start; libvirt keeps seconds)."""
    taken = datetime.fromisoformat(info.created_at.replace("Z", "+00:00"))
    started = datetime.fromisoformat(since.replace("Z", "+00:00")).replace(microsecond=0)
    return taken >= started


class SnapshotOperations:
    """Creates, restores and deletes snapshots of one node's VMs."""

    def __init__(self, snapshots: Snapshots, domains: Domains, qemu_img: QemuImg,
                 files_of: Callable[[str], VmFiles]) -> None:
        self.snapshots = snapshots
        self.domains = domains
        self.qemu_img = qemu_img
        self.files_of = files_of

    async def root_disk(self, vm: str) -> RootDisk:
        """The VM's own boot disk, or 422 when it has none (it boots from an ISO)."""
        disk = await self.domains.root_disk(vm, self.files_of(vm).vm_dir)
        if disk is None:
            raise Unprocessable(f"VM {vm} has no disk of its own to snapshot (it boots from an ISO image)", "vm")
        return disk

    # -- internal (bios) ------------------------------------------------------------------------------------
    async def create_internal(self, vm: str, name: str, description: str, progress: Progress,
                              resumed_since: str | None = None) -> Snapshot:
        """libvirt's internal snapshot: every qcow2 disk, and the memory when the VM runs.

        `resumed_since` is the task's start when it runs again after an interruption: a snapshot of that
        name taken since then is this task's own; on a first run the name must be free.
        """
        await self.domains.wait_idle(vm)  # a create libvirtd still runs for a caller that died
        existing = await self.snapshots.get(vm, name)
        if existing is None:
            running = await self.domains.is_running(vm)
            await progress(10, "saving disks and memory" if running else "saving disks")
            try:
                await self.snapshots.create_internal(vm, name, description)
            except HypervisorTimeout:
                if await self._outcome(vm, name) is None:
                    raise
            existing = await self.snapshots.get(vm, name)
            if existing is None:
                raise Internal(f"libvirt reported snapshot {name} of VM {vm} made, but does not list it")
        elif existing.external or resumed_since is None or not _taken_since(existing, resumed_since):
            raise Conflict(f"VM {vm} has a snapshot named {name} already", "name")
        return to_snapshot(vm, existing)

    async def _outcome(self, vm: str, name: str) -> SnapshotInfo | None:
        """After libvirt did not answer in time: wait for its job to end, then what it made of snapshot `name`."""
        await self.domains.wait_idle(vm)
        return await self.snapshots.get(vm, name)

    async def restore_internal(self, vm: str, name: str, task_id: str, progress: Progress) -> Snapshot:
        """Revert to an internal snapshot; the VM's definition (the lifecycle's) is kept as it is now."""
        await self.domains.wait_idle(vm)
        files = self.files_of(vm)
        files.ensure()
        saved = files.saved_definition(task_id)
        final = True
        try:
            # Kept in a file until the end: after a restart between the revert and the define, the
            # definition libvirt then shows is the snapshot's, and the lifecycle's would be lost.
            if saved.exists():
                definition = saved.read_text()
            else:
                definition = await self.domains.xml(vm, inactive=True)
                write_atomically(saved, definition)
            await progress(20, "reverting disks" + (" and memory" if await self._has_memory(vm, name) else ""))
            await self.snapshots.revert(vm, name)
            # libvirt also reverts the definition to the one saved in the snapshot: the spec may have changed
            # since (vm.update), and the spec is the lifecycle's, so its definition is put back for the next boot.
            if _canonical(await self.domains.xml(vm, inactive=True)) != _canonical(definition):
                await self.domains.define(definition)
            return to_snapshot(vm, await self._listed(vm, name))
        except asyncio.CancelledError:
            final = False  # cut by a shutdown: the task's next run needs the definition
            raise
        finally:
            if final:
                saved.unlink(missing_ok=True)

    async def _listed(self, vm: str, name: str) -> SnapshotInfo:
        info = await self.snapshots.get(vm, name)
        if info is None:
            raise Internal(f"snapshot {name} of VM {vm} is gone from libvirt's list")
        return info

    async def _has_memory(self, vm: str, name: str) -> bool:
        info = await self.snapshots.get(vm, name)
        return info is not None and info.state in ("running", "paused")

    async def delete_internal(self, vm: str, name: str, progress: Progress) -> None:
        """Delete an internal snapshot from the disks and libvirt; its children get its parent."""
        await self.domains.wait_idle(vm)
        if await self.snapshots.get(vm, name) is None:
            return  # deleted before an interruption
        await progress(20, "deleting the snapshot from the disks")
        await self.snapshots.delete(vm, name)

    # -- external (uefi) ------------------------------------------------------------------------------------
    async def create_external(self, vm: str, name: str, description: str, task_id: str,
                              progress: Progress, resumed_since: str | None = None) -> Snapshot:
        """Freeze the active image as the snapshot's and let the VM write to a new overlay on it.

        On a run after an interruption (`resumed_since`), a snapshot of that name is this task's own when
        it switched the disk to this task's overlay; on a first run the name must be free.
        """
        files = self.files_of(vm)
        files.ensure()
        await self.domains.wait_idle(vm)  # a snapshot libvirtd still takes for a worker that died
        overlay = files.top(task_id)
        existing = await self.snapshots.get(vm, name)
        if existing is not None:
            mine = resumed_since is not None and any(_same(f, overlay) for f in existing.overlays)
            if not mine:
                raise Conflict(f"VM {vm} has a snapshot named {name} already", "name")
        else:
            disk = await self.root_disk(vm)
            top = await self.active_image(vm, disk)
            await self._remove_strays(vm, files, top)  # files of an earlier attempt that libvirt never used
            frozen = files.frozen(name)
            if frozen.exists() and not frozen.samefile(top):
                raise Internal(f"the file {frozen} is in the way of snapshot {name}; remove it and try again")
            try:
                await progress(10, "preparing the overlay")
                if not frozen.exists():
                    os.link(top, frozen)  # the active image's data, under its frozen name (no copy)
                overlay.unlink(missing_ok=True)
                size = (await self.qemu_img.info(top)).virtual_size
                await self.qemu_img.create_overlay(overlay, frozen, "qcow2", size)
                others = await self._other_disks(vm, disk.target)
                await progress(40, "switching the VM to the overlay")
            except BaseException:
                _discard(overlay, frozen, top)  # libvirt has not seen them yet
                raise
            try:
                await self.snapshots.create_external(vm, name, description, disk.target, str(overlay), others)
            except HypervisorTimeout:
                # libvirtd's thread goes on after our deadline: the files stay until its job has ended.
                if await self._outcome(vm, name) is None:
                    _discard(overlay, frozen, top)
                    raise
            except HypervisorUnavailable:
                raise  # undecided (the connection broke): a later settle removes the files libvirt did not take
            except HypervisorError:
                _discard(overlay, frozen, top)  # libvirt refused (ATOMIC): the VM still writes to `top`
                raise
            existing = await self._listed(vm, name)
            # libvirt leaves the definition alone when it names the disk by another path (root.qcow2).
            await self.domains.set_root_source(vm, disk.target, str(overlay))
        await self.settle(vm)
        return to_snapshot(vm, existing)

    async def _other_disks(self, vm: str, root_target: str) -> tuple[str, ...]:
        root = ET.fromstring(await self.domains.xml(vm, inactive=True))
        targets = []
        for disk in root.iterfind("devices/disk"):
            target = disk.find("target")
            if target is not None and target.get("dev") and target.get("dev") != root_target:
                targets.append(target.get("dev") or "")
        return tuple(targets)

    async def active_image(self, vm: str, disk: RootDisk) -> Path:
        """The image the VM writes to: the running QEMU's (libvirt keeps a definition that names the disk
        by another path than the live one as it is), else the definition's."""
        live = await self.domains.live_source(vm, disk.target)
        return Path(os.path.realpath(live or disk.source))

    async def settle(self, vm: str) -> None:
        """Make the files agree with the active image: the definition names it without a recorded chain,
        root.qcow2 links to it, and no other active image or unrecorded snapshot file is left behind."""
        files = self.files_of(vm)
        disk = await self.root_disk(vm)
        active = await self.active_image(vm, disk)
        if disk.source != str(active) or "<backingStore" in await self._root_disk_xml(vm, disk.target):
            await self.domains.set_root_source(vm, disk.target, str(active))
        if not _same(files.root, active):
            if files.root.exists() and not files.root.is_symlink() and os.stat(files.root).st_nlink < 2:
                raise Internal(f"{files.root} is a file of its own, not the active image {active}: left alone")
            files.point_root_at(active)
        for top in files.tops():
            if not _same(top, active):
                log.info("VM %s: removing %s, no longer in use", vm, top.name)
                top.unlink(missing_ok=True)
        await self._remove_strays(vm, files, active)

    async def _remove_strays(self, vm: str, files: VmFiles, active: Path) -> None:
        """Remove the snapshot files libvirt has no snapshot for (left by a create that failed or was cut
        short before libvirt took it), unless an image still backs onto one."""
        images = files.images()
        strays = [image for image in images if frozen_name(image) is not None and not _same(image, active)]
        if not strays:
            return
        recorded = {info.name for info in await self.snapshots.list(vm)}
        strays = [image for image in strays if frozen_name(image) not in recorded]
        if not strays:
            return
        readers = [*images, files.root] if files.root.exists() and not files.root.is_symlink() else images
        backings = [(await self.qemu_img.info(image)).backing for image in readers if image not in strays]
        for stray in strays:
            if any(_same(backing, stray) for backing in backings):
                log.warning("VM %s: %s has no snapshot in libvirt but an image reads it: left", vm, stray.name)
                continue
            log.info("VM %s: removing %s, a snapshot file libvirt does not know", vm, stray.name)
            stray.unlink(missing_ok=True)

    async def _root_disk_xml(self, vm: str, target: str) -> str:
        root = ET.fromstring(await self.domains.xml(vm, inactive=True))
        for disk in root.iterfind("devices/disk"):
            found = disk.find("target")
            if found is not None and found.get("dev") == target:
                return ET.tostring(disk, encoding="unicode")
        return ""

    async def restore_external(self, vm: str, name: str, task_id: str, progress: Progress) -> Snapshot:
        """Stop the VM, give it a new overlay on the snapshot's image, start it again if it ran."""
        files = self.files_of(vm)
        frozen = files.frozen(name)
        intent = files.intent(task_id)
        final = True
        try:
            await self.domains.wait_idle(vm)
            if await self.snapshots.get(vm, name) is None:
                raise NotFound(f"VM {vm} has no snapshot named {name}", "name")
            if not frozen.exists():
                raise Internal(f"the disk image of snapshot {name} ({frozen}) is missing")
            if intent.exists():
                was_running = intent.read_text().strip() == "running"
            else:
                was_running = await self.domains.is_running(vm)
                write_atomically(intent, "running\n" if was_running else "stopped\n")
            disk = await self.root_disk(vm)
            new_top = files.top(task_id)
            if not _same(await self.active_image(vm, disk), new_top):
                if await self.domains.is_running(vm):
                    await progress(20, "stopping the VM")
                    await self.domains.destroy(vm)
                await progress(40, "making a new overlay on the snapshot")
                new_top.unlink(missing_ok=True)
                size = (await self.qemu_img.info(frozen)).virtual_size
                await self.qemu_img.create_overlay(new_top, frozen, "qcow2", size)
                await self.domains.set_root_source(vm, disk.target, str(new_top))
            await self.settle(vm)  # root.qcow2 -> new overlay; the discarded active image is removed
            await self.snapshots.make_current(vm, name)
            if was_running and not await self.domains.is_running(vm):
                await progress(80, "starting the VM")
                await self.domains.start(vm)
            return to_snapshot(vm, await self._listed(vm, name))
        except asyncio.CancelledError:
            final = False  # cut by a shutdown: the task's next run needs to know whether the VM ran
            raise
        finally:
            if final:
                intent.unlink(missing_ok=True)

    async def delete_external(self, vm: str, name: str, progress: Progress) -> None:
        """Merge the snapshot's image into every image on it (online into the running top), then drop it."""
        files = self.files_of(vm)
        frozen = files.frozen(name)
        await self.domains.wait_idle(vm)
        info = await self.snapshots.get(vm, name)
        if frozen.exists():
            header = await self.qemu_img.info(frozen)
            base, base_format = header.backing, header.backing_format
            disk = await self.root_disk(vm)
            active = await self.active_image(vm, disk)
            if await self.domains.is_running(vm):
                await self.domains.wait_block_job(vm, disk.target)  # a pull that survived our restart
                chain = [os.path.realpath(image.path) for image in await self.qemu_img.chain(active)]
                if os.path.realpath(frozen) in chain:
                    depth = chain.index(os.path.realpath(frozen))
                    target = await self.domains.live_index(vm, disk.target, depth + 1) if base else None
                    if base and target is None:
                        raise Internal(f"the running chain of VM {vm} does not show the image below {frozen.name}")
                    await progress(30, "merging the snapshot into the running disk")
                    await self.domains.block_pull(vm, disk.target, target)
            for image in files.images():
                if _same(image, frozen):
                    continue
                if _same((await self.qemu_img.info(image)).backing, frozen):
                    if _same(image, active) and await self.domains.is_running(vm):
                        raise Internal(f"the running disk of VM {vm} still reads {frozen.name}")
                    await progress(60, f"merging the snapshot into {image.name}")
                    await self.qemu_img.rebase(image, base, base_format)
        if info is not None:
            await progress(90, "removing the snapshot")
            await self.snapshots.delete(vm, name, metadata_only=True)
        frozen.unlink(missing_ok=True)


def _discard(overlay: Path, frozen: Path, top: Path) -> None:
    """Remove what create_external prepared: its overlay, and the frozen name while it is only a second
    name of the still active image."""
    overlay.unlink(missing_ok=True)
    if frozen.exists() and frozen.samefile(top):
        frozen.unlink()


def _canonical(xml: str) -> str:
    return ET.tostring(ET.fromstring(xml), encoding="unicode")
