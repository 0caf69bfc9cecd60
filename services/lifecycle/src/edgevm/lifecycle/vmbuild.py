"""Building a VM: checks of a spec against the node, disks and seed, define, repair."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from edgevm.lifecycle.images import ImageService
from edgevm.lifecycle.network import Attachment, VmNetwork
from edgevm.lifecycle.paths import confine, is_store_path
from edgevm.lifecycle.planner import Planner, VolumeFile, nic_plans, seed_content
from edgevm.lifecycle.seed import write_seed
from edgevm.lifecycle.userdata import validate_meta_data, validate_network_config, validate_user_data
from edgevm.shared import qcow2
from edgevm.shared.errors import InvalidRequest
from edgevm.shared.layout import Layout, make_walkable_dir
from edgevm.shared.libvirt.definitions import Definitions
from edgevm.shared.objects import Vm
from edgevm.shared.qemuimg import QemuImg
from edgevm.shared.spec import VmSpec

log = logging.getLogger(__name__)


class VmBuilder:
    """Makes, checks and removes what a VM is on disk and in libvirt's definitions."""

    def __init__(self, node: str, images: ImageService, planner: Planner, definitions: Definitions,
                 network: VmNetwork, host_cpus: int, host_memory: int, qemu_img: QemuImg | None = None) -> None:
        self.node = node
        self.images = images
        self.planner = planner
        self.definitions = definitions
        self.network = network
        self.host_cpus = host_cpus
        self.host_memory = host_memory
        self.qemu_img = qemu_img or QemuImg()

    @property
    def layout(self) -> Layout:
        """The node's lifecycle directories."""
        return self.planner.layout

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
        paths.update(self._volume_sources(spec))
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

    def _volume_sources(self, spec: VmSpec) -> dict[str, Path]:
        paths = {}
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
        return paths

    async def _make_files(self, spec: VmSpec, paths: dict[str, Path], attachment: Attachment) -> list[VolumeFile]:
        make_walkable_dir(self.layout.vm_dir(spec.name))
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

    async def define(
        self, spec: VmSpec, revision: int, paths: dict[str, Path], attachment: Attachment | None = None
    ) -> list[str]:
        """Make the VM's files and (re)define its domain; return the addresses netplumb gave its NICs."""
        # netplumb first: its answer (NICs, network-config) goes into the domain and the seed, and its
        # refusal (a taken port, an unknown VRF) must come before any file is made.
        if attachment is None:
            attachment = await self.network.prepare(spec)
        files = await self._make_files(spec, paths, attachment)
        plan = self.planner.domain(spec, revision, files, nic_plans(spec, attachment.nics))
        await self.definitions.define(plan)
        return [nic.address.split("/")[0] for nic in attachment.nics if nic.address]

    async def remove(self, vm: str) -> None:
        """Remove the VM's directory and everything in it."""
        await asyncio.to_thread(shutil.rmtree, self.layout.vm_dir(vm), True)

    async def repair(self, vm: Vm) -> None:
        """Before a start: make again a seed or a fresh overlay that a power cut left empty or short.

        They are written atomically but not fsynced (see `_make_files`); a file the cut tore is one nothing
        had written to yet, so making it again loses nothing.
        """
        name = vm.spec.name
        seed = self.planner.seed_path(name)
        root = self.layout.root_disk(name)
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
            await self.define(vm.spec, vm.status.revision, self.check_spec(vm.spec))
