"""edgevm-flowwatch: conntrack flows of a node's VMs."""

from __future__ import annotations

import os

from edgevm.flowwatch.app import make_setup
from edgevm.shared.runtime import main as run


def main() -> None:
    """Run the flowwatch service until SIGTERM.

    EDGEVM_NODE_NETNS (as for netplumb) names a namespace to treat as the node's own (default: the process's),
    so that a test or a second node on one host can watch its own world while NATS stays on loopback.
    """
    run("flowwatch", make_setup(os.environ.get("EDGEVM_NODE_NETNS") or None))


if __name__ == "__main__":
    main()
