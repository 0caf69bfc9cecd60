"""Flowwatch's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

FLOWS = Counter("edgevm_flowwatch_flows_total", "Flows opened, closed and terminated, by VM.", ["vm", "event"])
CT_EVENTS = Counter("edgevm_flowwatch_conntrack_events_total", "Conntrack events processed, by namespace.", ["netns"])
OVERRUNS = Counter(
    "edgevm_flowwatch_overruns_total", "Conntrack event losses (netlink overruns), by namespace.", ["netns"]
)
RESYNCS = Counter(
    "edgevm_flowwatch_resyncs_total", "Full conntrack dumps applied, by namespace and reason.", ["netns", "reason"]
)
DUMP_DURATION = Histogram(
    "edgevm_flowwatch_dump_duration_seconds",
    "Time to dump and apply a namespace's conntrack table.",
    ["netns"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
WATCHED = Gauge("edgevm_flowwatch_namespaces", "Namespaces watched.")
DROPPED = Counter(
    "edgevm_flowwatch_dropped_events_total",
    "Flow messages dropped because the outbox was full, by type (flow.opened first; history when past its cap).",
    ["type"],
)
PUBLISH_FAILURES = Counter("edgevm_flowwatch_publish_failures_total", "Flow messages JetStream did not acknowledge.")
