"""edgevm-snapshotter: snapshots of one node's VMs, run as tasks from a JetStream work queue."""

from __future__ import annotations

from edgevm.shared.runtime import main as run
from edgevm.snapshotter.app import setup


def main() -> None:
    """Run the snapshotter service until SIGTERM."""
    run("snapshotter", setup)


if __name__ == "__main__":
    main()
