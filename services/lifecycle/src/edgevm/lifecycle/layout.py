"""Where a node's lifecycle files live: the image store, and one directory per VM."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """The lifecycle's directories under the node's state dir."""

    root: Path

    @property
    def images(self) -> Path:
        """The image store."""
        return self.root / "images"

    @property
    def volumes(self) -> Path:
        """The volume store: files a Volume's `source` may name by a relative path."""
        return self.root / "volumes"

    def vm_dir(self, vm: str) -> Path:
        """The directory of one VM's disks, seed, NVRAM and console log."""
        return self.root / "vms" / vm

    def ensure(self) -> None:
        """Create the directories; QEMU runs as its own user and must be able to walk into them."""
        for path in (self.root, self.images, self.volumes, self.root / "vms"):
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o755)


def fsync_dir(directory: Path) -> None:
    """Make a rename or link in `directory` durable (the directory entry itself is fsynced)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
