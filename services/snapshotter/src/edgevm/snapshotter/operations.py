"""What each snapshot task does to libvirt and the VM's files: internal (bios) and external (uefi) modes.

Every operation is written to be run again after an interruption: it first looks at libvirt's real state
(the snapshot metadata, the domain's definition, the image headers) and does only what is still missing.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from pathlib import Path

from edgevm.shared.errors import Conflict, Internal, NotFound, Unprocessable
from edgevm.shared.objects import Snapshot
from edgevm.snapshotter.drivers.domains import Domains, RootDisk
from edgevm.snapshotter.drivers.qemuimg import QemuImg
from edgevm.snapshotter.drivers.snapshots import SnapshotInfo, Snapshots
from edgevm.snapshotter.layers import VmFiles

log = logging.getLogger(__name__)
Progress = Callable[[int, str], Awaitable[None]]
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
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


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
    async def create_internal(self, vm: str, name: str, description: str, progress: Progress) -> Snapshot:
        """libvirt's internal snapshot: every qcow2 disk, and the memory when the VM runs."""
        await self.domains.wait_idle(vm)  # a create libvirtd still runs for a caller that died
        existing = await self.snapshots.get(vm, name)
        if existing is None:
            running = await self.domains.is_running(vm)
            await progress(10, "saving disks and memory" if running else "saving disks")
            await self.snapshots.create_internal(vm, name, description)
            existing = await self.snapshots.get(vm, name)
            if existing is None:
                raise Internal(f"libvirt reported snapshot {name} of VM {vm} made, but does not list it")
        elif existing.external:
            raise Conflict(f"VM {vm} has an external snapshot named {name} already", "name")
        return to_snapshot(vm, existing)

    async def restore_internal(self, vm: str, name: str, progress: Progress) -> Snapshot:
        """Revert to an internal snapshot; the VM's definition (the lifecycle's) is kept as it is now."""
        await self.domains.wait_idle(vm)
        definition = await self.domains.xml(vm, inactive=True)
        await progress(20, "reverting disks" + (" and memory" if await self._has_memory(vm, name) else ""))
        await self.snapshots.revert(vm, name)
        # libvirt also reverts the definition to the one saved in the snapshot: the spec may have changed
        # since (vm.update), and the spec is the lifecycle's, so its definition is put back for the next boot.
        if _canonical(await self.domains.xml(vm, inactive=True)) != _canonical(definition):
            await self.domains.define(definition)
        info = await self.snapshots.get(vm, name)
        assert info is not None
        return to_snapshot(vm, info)

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
                              progress: Progress) -> Snapshot:
        """Freeze the active image as the snapshot's and let the VM write to a new overlay on it."""
        files = self.files_of(vm)
        files.ensure()
        existing = await self.snapshots.get(vm, name)
        if existing is not None and not existing.external:
            raise Conflict(f"VM {vm} has an internal snapshot named {name} already", "name")
        if existing is None:
            disk = await self.root_disk(vm)
            top = await self.active_image(vm, disk)
            frozen, overlay = files.frozen(name), files.top(task_id)
            if frozen.exists() and not frozen.samefile(top):
                raise Internal(f"the file {frozen} is in the way of snapshot {name}; remove it and try again")
            await progress(10, "preparing the overlay")
            if not frozen.exists():
                os.link(top, frozen)  # the active image's data, under its frozen name (no copy)
            overlay.unlink(missing_ok=True)
            size = (await self.qemu_img.info(top)).virtual_size
            await self.qemu_img.create_overlay(overlay, frozen, size)
            others = await self._other_disks(vm, disk.target)
            await progress(40, "switching the VM to the overlay")
            try:
                await self.snapshots.create_external(vm, name, description, disk.target, str(overlay), others)
            except BaseException:
                overlay.unlink(missing_ok=True)
                frozen.unlink(missing_ok=True)  # only a second name of the still active image
                raise
            existing = await self.snapshots.get(vm, name)
            if existing is None:
                raise Internal(f"libvirt reported snapshot {name} of VM {vm} made, but does not list it")
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
        root.qcow2 links to it, and no other active image is left behind."""
        files = self.files_of(vm)
        disk = await self.root_disk(vm)
        active = await self.active_image(vm, disk)
        if disk.source != str(active) or "<backingStore" in await self._root_disk_xml(vm, disk.target):
            await self.domains.set_root_source(vm, disk.target, str(active))
        if active != files.root:
            if files.root.exists() and not files.root.is_symlink() and os.stat(files.root).st_nlink < 2:
                raise Internal(f"{files.root} is a file of its own, not the active image {active}: left alone")
            files.point_root_at(active)
        for top in files.tops():
            if top != active:
                log.info("VM %s: removing %s, no longer in use", vm, top.name)
                top.unlink(missing_ok=True)

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
        if await self.snapshots.get(vm, name) is None:
            raise NotFound(f"VM {vm} has no snapshot named {name}", "name")
        if not frozen.exists():
            raise Internal(f"the disk image of snapshot {name} ({frozen}) is missing")
        intent = files.intent(task_id)
        if intent.exists():
            was_running = intent.read_text().strip() == "running"
        else:
            was_running = await self.domains.is_running(vm)
            intent.write_text("running\n" if was_running else "stopped\n")
        disk = await self.root_disk(vm)
        new_top = files.top(task_id)
        if not _same(await self.active_image(vm, disk), new_top):
            if await self.domains.is_running(vm):
                await progress(20, "stopping the VM")
                await self.domains.destroy(vm)
            await progress(40, "making a new overlay on the snapshot")
            new_top.unlink(missing_ok=True)
            size = (await self.qemu_img.info(frozen)).virtual_size
            await self.qemu_img.create_overlay(new_top, frozen, size)
            await self.domains.set_root_source(vm, disk.target, str(new_top))
        await self.settle(vm)  # root.qcow2 -> new overlay; the discarded active image is removed
        await self.snapshots.make_current(vm, name)
        if was_running and not await self.domains.is_running(vm):
            await progress(80, "starting the VM")
            await self.domains.start(vm)
        intent.unlink(missing_ok=True)
        info = await self.snapshots.get(vm, name)
        assert info is not None
        return to_snapshot(vm, info)

    async def delete_external(self, vm: str, name: str, progress: Progress) -> None:
        """Merge the snapshot's image into every image on it (online into the running top), then drop it."""
        files = self.files_of(vm)
        frozen = files.frozen(name)
        info = await self.snapshots.get(vm, name)
        if frozen.exists():
            header = await self.qemu_img.info(frozen)
            base, base_format = header.backing, header.backing_format
            disk = await self.root_disk(vm)
            active = await self.active_image(vm, disk)
            if await self.domains.is_running(vm):
                await self.domains.wait_block_job(vm, disk.target)  # a pull that survived our restart
                chain = [os.path.realpath(image.path) for image in await self.qemu_img.chain(active)]
                if str(frozen) in chain:
                    depth = chain.index(str(frozen))
                    target = await self.domains.live_index(vm, disk.target, depth + 1) if base else None
                    if base and target is None:
                        raise Internal(f"the running chain of VM {vm} does not show the image below {frozen.name}")
                    await progress(30, "merging the snapshot into the running disk")
                    await self.domains.block_pull(vm, disk.target, target)
            for image in files.images():
                if image == frozen:
                    continue
                if _same((await self.qemu_img.info(image)).backing, frozen):
                    if image == active and await self.domains.is_running(vm):
                        raise Internal(f"the running disk of VM {vm} still reads {frozen.name}")
                    await progress(60, f"merging the snapshot into {image.name}")
                    await self.qemu_img.rebase(image, base, base_format)
        if info is not None:
            await progress(90, "removing the snapshot")
            await self.snapshots.delete(vm, name, metadata_only=True)
        frozen.unlink(missing_ok=True)


def _canonical(xml: str) -> str:
    return ET.tostring(ET.fromstring(xml), encoding="unicode")
