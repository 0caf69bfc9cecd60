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

from edgevm.shared.layout import ROOT_DISK, SNAPSHOTS, fsync_dir, make_walkable_dir

FROZEN_PREFIX = "snap-"
TOP_PREFIX = "active-"


def frozen_name(path: Path) -> str | None:
    """The snapshot whose frozen image `path` is (by its file name), or None for another file."""
    if path.suffix != ".qcow2" or not path.name.startswith(FROZEN_PREFIX):
        return None
    return path.name[len(FROZEN_PREFIX):-len(".qcow2")]


@dataclass(frozen=True)
class VmFiles:
    """The snapshot files of one VM, by their real path: the state directory may be reached through a
    symbolic link or named relatively, and every comparison with libvirt's or QEMU's paths needs one name
    per file."""

    vm_dir: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "vm_dir", Path(os.path.realpath(self.vm_dir)))

    @property
    def root(self) -> Path:
        """The path the lifecycle defines the boot disk with."""
        return self.vm_dir / ROOT_DISK

    @property
    def layers(self) -> Path:
        """The directory of the chain's images."""
        return self.vm_dir / SNAPSHOTS

    def frozen(self, snapshot: str) -> Path:
        """The image holding the disk as snapshot `snapshot` took it."""
        return self.layers / f"{FROZEN_PREFIX}{snapshot}.qcow2"

    def top(self, task_id: str) -> Path:
        """The new active image made by task `task_id`."""
        return self.layers / f"{TOP_PREFIX}{task_id.lower()}.qcow2"

    def intent(self, task_id: str) -> Path:
        """What a running restore must remember across a restart of the service."""
        return self.layers / f".restore-{task_id.lower()}"

    def saved_definition(self, task_id: str) -> Path:
        """The domain definition an internal restore puts back, kept across a restart of the service."""
        return self.layers / f".restore-{task_id.lower()}.xml"

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
        make_walkable_dir(self.layers)

    def point_root_at(self, top: Path) -> None:
        """Make `root.qcow2` a link to `top`, atomically (a reader sees the old or the new target)."""
        if self.root.is_symlink() and os.readlink(self.root) == str(top):
            return
        temporary = self.vm_dir / f".{ROOT_DISK}.new"
        temporary.unlink(missing_ok=True)
        os.symlink(top, temporary)
        os.rename(temporary, self.root)
        fsync_dir(self.vm_dir)

