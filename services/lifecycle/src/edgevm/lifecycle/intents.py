"""Marks of creations under way (a VM, an image): what one cut by a crash left behind is found and removed.

vm.create marks its VM here before it asks netplumb for anything and clears the mark once the VM's record
is written (or its undo is done). A mark left with no record is a create the process died in: its network,
domain and directory are this service's own half-made work, which the start-up sweep (or the next create of
that name) removes. Without a mark, a record-less directory or domain is not known to be ours and is left
alone (vm.create then refuses the name, asking for it to be removed by hand). image.import marks its image
the same way, in `<state>/lifecycle/importing/`, until the image's record is written.
"""

from __future__ import annotations

from pathlib import Path


class Intents:
    """One empty file per thing being created, in a directory of its own."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mark(self, name: str) -> None:
        """Record that a create of `name` begins."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / name).touch()

    def marked(self, name: str) -> bool:
        """Whether a create of `name` began and was neither finished nor undone."""
        return (self.root / name).exists()

    def clear(self, name: str) -> None:
        """The create of `name` is over (its record is written, or all it made is removed)."""
        (self.root / name).unlink(missing_ok=True)

    def pending(self) -> list[str]:
        """The names whose create began and never ended."""
        return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []
