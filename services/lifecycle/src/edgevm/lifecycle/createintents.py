"""Marks of the VM creates under way: what a create cut by a crash left behind is found and removed.

vm.create marks its VM here before it asks netplumb for anything and clears the mark once the VM's record
is written (or its undo is done). A mark left with no record is a create the process died in: its network,
domain and directory are this service's own half-made work, which the start-up sweep (or the next create of
that name) removes. Without a mark, a record-less directory or domain is not known to be ours and is left
alone (vm.create then refuses the name, asking for it to be removed by hand).
"""

from __future__ import annotations

from pathlib import Path


class CreateIntents:
    """One empty file per VM being created, in `<state>/lifecycle/creating/`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mark(self, vm: str) -> None:
        """Record that a create of `vm` begins."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / vm).touch()

    def marked(self, vm: str) -> bool:
        """Whether a create of `vm` began and was neither finished nor undone."""
        return (self.root / vm).exists()

    def clear(self, vm: str) -> None:
        """The create of `vm` is over (its record is written, or all it made is removed)."""
        (self.root / vm).unlink(missing_ok=True)

    def pending(self) -> list[str]:
        """The VMs whose create began and never ended."""
        return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []
