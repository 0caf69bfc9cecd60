"""edgevm-snapshotter: snapshots of one node's VMs, run as tasks from a JetStream work queue."""

from __future__ import annotations

from edgevm.shared.runtime import main as run
from edgevm.snapshotter.app import make_setup, workers_from_env


def main() -> None:
    """Run the snapshotter service until SIGTERM; a bad setting ends it at once with a one-line message."""
    try:
        workers = workers_from_env()
    except ValueError as exc:
        raise SystemExit(f"edgevm-snapshotter: {exc}") from None
    run("snapshotter", make_setup(workers))


if __name__ == "__main__":
    main()
