"""edgevm-netplumb: VRFs, VM NICs, port mappings, virtual networks and virtual interfaces of one node."""

from __future__ import annotations

from edgevm.netplumb.app import setup
from edgevm.shared.runtime import main as run


def main() -> None:
    """Run the netplumb service until SIGTERM."""
    run("netplumb", setup)


if __name__ == "__main__":
    main()
