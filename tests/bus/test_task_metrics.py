"""Task metrics counted where every task write passes: the TaskStore, on a real JetStream bucket."""

from __future__ import annotations

import secrets

import msgspec
from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY

from edgevm.shared.bus import TASKS, ensure_jetstream
from edgevm.shared.clock import now
from edgevm.shared.ids import new_id
from edgevm.shared.objects import Task
from edgevm.shared.publisher import EventPublisher
from edgevm.shared.tasks import TaskStore, task_key


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_transitions_count_outcomes_durations_and_active_tasks(nc: NATS) -> None:
    node = f"tm{secrets.token_hex(3)}"
    js = nc.jetstream()
    buckets = await ensure_jetstream(js)
    store = TaskStore(buckets[TASKS.name], EventPublisher(js, node, "lifecycle"), node)

    first, rev1 = await store.create("vm.start", "web")
    second, rev2 = await store.create("vm.start", "web")
    third, rev3 = await store.create("image.import")
    # Each outcome of a task is a series from its creation on (at 0), so that increase() sees the task end.
    assert REGISTRY.get_sample_value("edgevm_tasks_total", {"node": node, "vm": "web", "kind": "vm.start",
                                                             "outcome": "failed"}) == 0
    assert value("edgevm_tasks_active", node=node, kind="vm.start", status="queued") == 2
    first, rev1 = await store.update(first, rev1, status="running")
    assert value("edgevm_tasks_active", node=node, kind="vm.start", status="queued") == 1
    assert value("edgevm_tasks_active", node=node, kind="vm.start", status="running") == 1
    first, rev1 = await store.update(first, rev1, progress=50, message="half way")  # no transition
    assert value("edgevm_tasks_active", node=node, kind="vm.start", status="running") == 1

    await store.update(first, rev1, status="succeeded")
    await store.update(second, rev2, status="failed", error="no")
    await store.update(third, rev3, status="cancelled")
    for status in ("queued", "running"):
        assert value("edgevm_tasks_active", node=node, kind="vm.start", status=status) == 0
    assert value("edgevm_tasks_total", node=node, vm="web", kind="vm.start", outcome="succeeded") == 1
    assert value("edgevm_tasks_total", node=node, vm="web", kind="vm.start", outcome="failed") == 1
    assert value("edgevm_tasks_total", node=node, vm="", kind="image.import", outcome="cancelled") == 1
    assert value("edgevm_task_duration_seconds_count", node=node, kind="vm.start") == 2
    assert value("edgevm_task_duration_seconds_sum", node=node, kind="vm.start") >= 0


async def test_a_task_written_by_an_earlier_process_counts_its_outcome_only(nc: NATS) -> None:
    node = f"tm{secrets.token_hex(3)}"
    js = nc.jetstream()
    buckets = await ensure_jetstream(js)
    # Queued by a process that is gone (as lifecycle finds its tasks after a restart): written to the bucket only.
    earlier = Task(id=new_id(), node=node, kind="snapshot.create", vm="db", status="queued", created_at=now())
    await buckets[TASKS.name].create(task_key(node, earlier.id), msgspec.json.encode(earlier))
    store = TaskStore(buckets[TASKS.name], EventPublisher(js, node, "lifecycle"), node)
    stored, revision = await store.get(earlier.id)
    await store.update(stored, revision, status="failed", error="interrupted")
    assert value("edgevm_tasks_active", node=node, kind="snapshot.create", status="queued") == 0, "never below 0"
    assert value("edgevm_tasks_total", node=node, vm="db", kind="snapshot.create", outcome="failed") == 1
