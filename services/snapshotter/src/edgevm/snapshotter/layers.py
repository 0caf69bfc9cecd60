"""Where a VM's external snapshot images live in its directory, and the `root.qcow2` link to the top.

`<vm_dir>/snapshots/snap-<name>.qcow2` holds the disk as it was when snapshot <name> was taken (frozen,
never written again); it backs onto its parent's file (or the VM's image). The VM writes to
`<vm_dir>/snapshots/active-<task>.qcow2`, the top of the chain, and `<vm_dir>/root.qcow2` (where the
lifecycle service defines the disk) is a symbolic link to that top, replaced atomically by rename.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

FROZEN_PREFIX = "snap-"
TOP_PREFIX = "active-"


def vm_dir(state_dir: Path, vm: str) -> Path:
    """The directory of a VM's files, as the lifecycle service lays it out."""
    return state_dir / "lifecycle" / "vms" / vm


@dataclass(frozen=True)
class VmFiles:
    """The snapshot files of one VM."""

    vm_dir: Path

    @property
    def root(self) -> Path:
        """The path the lifecycle defines the boot disk with."""
        return self.vm_dir / "root.qcow2"

    @property
    def layers(self) -> Path:
        """The directory of the chain's images."""
        return self.vm_dir / "snapshots"

    def frozen(self, snapshot: str) -> Path:
        """The image holding the disk as snapshot `snapshot` took it."""
        return self.layers / f"{FROZEN_PREFIX}{snapshot}.qcow2"

    def top(self, task_id: str) -> Path:
        """The new active image made by task `task_id`."""
        return self.layers / f"{TOP_PREFIX}{task_id.lower()}.qcow2"

    def intent(self, task_id: str) -> Path:
        """What a running restore must remember across a restart of the service."""
        return self.layers / f".restore-{task_id.lower()}"

    def images(self) -> list[Path]:
        """Every chain image in the layers directory."""
        if not self.layers.is_dir():
            return []
        return sorted(p for p in self.layers.iterdir() if p.suffix == ".qcow2"
                      and p.name.startswith((FROZEN_PREFIX, TOP_PREFIX)))

    def tops(self) -> list[Path]:
        """The active images (the current one and any left behind)."""
        return [p for p in self.images() if p.name.startswith(TOP_PREFIX)]

    def ensure(self) -> None:
        """Create the layers directory; QEMU runs as its own user and must be able to walk into it."""
        self.layers.mkdir(exist_ok=True)
        os.chmod(self.layers, 0o755)

    def point_root_at(self, top: Path) -> None:
        """Make `root.qcow2` a link to `top`, atomically (a reader sees the old or the new target)."""
        if self.root.is_symlink() and os.readlink(self.root) == str(top):
            return
        temporary = self.vm_dir / ".root.qcow2.new"
        temporary.unlink(missing_ok=True)
        os.symlink(top, temporary)
        os.rename(temporary, self.root)
        _fsync_dir(self.vm_dir)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
