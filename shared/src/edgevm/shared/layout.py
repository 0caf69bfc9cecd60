"""Where a node's VM files live, for both services that touch them: the lifecycle makes them, the
snapshotter layers snapshot images under them.

    <state>/lifecycle/images/<name>.<format>     the image store
    <state>/lifecycle/volumes/...                 files a Volume's `source` may name by a relative path
    <state>/lifecycle/vms/<vm>/                   one VM: root.qcow2 (its boot disk, maybe a link to the
                                                  top of its snapshot chain), seed.iso, volume-<name>.qcow2,
                                                  nvram.fd, console.log, snapshots/ (the snapshotter's)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT_DISK = "root.qcow2"
SNAPSHOTS = "snapshots"


@dataclass(frozen=True)
class Layout:
    """The lifecycle's directories under the node's state dir."""

    root: Path

    @classmethod
    def of(cls, state_dir: Path) -> Layout:
        """The layout of the node whose state directory is `state_dir`."""
        return cls(state_dir / "lifecycle")

    @property
    def images(self) -> Path:
        """The image store."""
        return self.root / "images"

    @property
    def volumes(self) -> Path:
        """The volume store: files a Volume's `source` may name by a relative path."""
        return self.root / "volumes"

    def vm_dir(self, vm: str) -> Path:
        """The directory of one VM's disks, seed, NVRAM, console log and snapshot images."""
        return self.root / "vms" / vm

    def root_disk(self, vm: str) -> Path:
        """The path a VM's boot disk is defined with."""
        return self.vm_dir(vm) / ROOT_DISK

    def ensure(self) -> None:
        """Create the directories; QEMU runs as its own user and must be able to walk into them."""
        for path in (self.root, self.images, self.volumes, self.root / "vms"):
            make_walkable_dir(path)


def make_walkable_dir(path: Path) -> None:
    """Create `path` (and its parents) with mode 0755: QEMU runs as its own user and walks into it."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o755)


def fsync_dir(directory: Path) -> None:
    """Make a rename or link in `directory` durable (the directory entry itself is fsynced)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str) -> None:
    """Write `path` so that a reader (or a restart) sees the whole text or no file."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text)
    os.rename(temporary, path)
