"""edgevm-lifecycle: images, VMs and tasks of one node."""

from __future__ import annotations

from edgevm.lifecycle.app import setup
from edgevm.shared.runtime import main as run


def main() -> None:
    """Run the lifecycle service until SIGTERM."""
    run("lifecycle", setup)


if __name__ == "__main__":
    main()
