"""netplumb's own metrics: how long reconciles take, what they had to change, and what they could not."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RECONCILE_DURATION = Histogram(
    "edgevm_netplumb_reconcile_duration_seconds",
    "Time of a verifying pass over the node's namespaces, bridges, wires and tables (start-up, timer, request).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
RECONCILE_CHANGES = Counter(
    "edgevm_netplumb_reconcile_changes", "Repairs reconciles made (each thing the kernel lacked or had extra)."
)
RECONCILE_FAILURES = Counter(
    "edgevm_netplumb_reconcile_failures", "Things reconciles could not set right, and reconciles that failed whole."
)
CONVERGE_NAMESPACES = Histogram(
    "edgevm_netplumb_converge_namespaces",
    "Namespaces one converge looked at: compared, read or changed "
    "(kind: change, a command's; reconcile, one part of a reconcile).",
    ["kind"],
    buckets=(1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
