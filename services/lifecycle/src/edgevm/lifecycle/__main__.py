"""edgevm-lifecycle: images, VMs and tasks of one node."""

from __future__ import annotations

from edgevm.lifecycle.app import setup
from edgevm.lifecycle.reach import StateDirUnreachable
from edgevm.shared.runtime import main as run


def main() -> None:
    """Run the lifecycle service until SIGTERM; a state directory QEMU cannot reach ends it with one line."""
    try:
        run("lifecycle", setup)
    except StateDirUnreachable as exc:
        raise SystemExit(f"edgevm-lifecycle: {exc}") from None


if __name__ == "__main__":
    main()
