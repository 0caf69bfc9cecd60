"""The NATS side of a service: connecting, and the JetStream streams and KV buckets edgevm uses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from edgevm.shared import subjects

log = logging.getLogger(__name__)

DAY = 24 * 3600
# nats-py's outgoing buffer (its default is 2 MiB). A message that overflows it makes the publish wait until the
# server has read everything pending: a 2.7 MB gw.vm.list reply then held its handler ~5-9 ms. Larger than
# the biggest message (the servers' max_payload, 8 MiB), so no single reply waits; it also bounds what is
# buffered while reconnecting.
PENDING_BYTES = 32 * 1024 * 1024

EVENTS_STREAM = StreamConfig(
    name="EDGEVM_EVENTS",
    subjects=[f"{subjects.EVENTS}.>"],  # a node stores only its own: see events_stream
    retention=RetentionPolicy.LIMITS,
    max_age=7 * DAY,
    max_bytes=1 << 30,
    storage=StorageType.FILE,
    discard=DiscardPolicy.OLD,
    duplicate_window=120,
)


def events_stream(node: str | None) -> StreamConfig:
    """Return node `node`'s EDGEVM_EVENTS: its own events only (`edgevm.evt.<node>.>`), all with None.

    Per node because in a fleet two JetStream domains storing the same subject would both keep it.
    """
    if node is None:
        return EVENTS_STREAM
    config: StreamConfig = EVENTS_STREAM.evolve(subjects=[subjects.all_events(node)])
    return config


FLOWS_STREAM = StreamConfig(
    name="EDGEVM_FLOWS",
    subjects=[f"{subjects.FLOW_LOG}.>"],
    retention=RetentionPolicy.LIMITS,
    max_age=7 * DAY,
    max_bytes=1 << 30,
    storage=StorageType.FILE,
    discard=DiscardPolicy.OLD,
)
SNAPSHOT_WORK_STREAM = StreamConfig(
    name="EDGEVM_SNAPSHOT_WORK",
    subjects=[f"{subjects.SNAPSHOT_WORK}.>"],
    retention=RetentionPolicy.WORK_QUEUE,
    storage=StorageType.FILE,
    duplicate_window=24 * 3600,
)


@dataclass(frozen=True)
class Bucket:
    """A KV bucket edgevm uses and how long its entries live."""

    name: str
    history: int = 1
    ttl: float = 0  # seconds; 0 keeps entries until deleted


VMS = Bucket("edgevm_vms")
IMAGES = Bucket("edgevm_images")
NET = Bucket("edgevm_net")
# "Recent Tasks": a task row lives a week after its last change.
TASKS = Bucket("edgevm_tasks", history=1, ttl=7 * DAY)
# Leases: an entry that its holder stops refreshing expires (see locks.py).
LOCKS = Bucket("edgevm_locks", history=1, ttl=30)

STREAMS = (EVENTS_STREAM, FLOWS_STREAM, SNAPSHOT_WORK_STREAM)
BUCKETS = (VMS, IMAGES, NET, TASKS, LOCKS)


async def connect(url: str, name: str, closed: asyncio.Event | None = None, seed_file: str | None = None) -> NATS:
    """Connect to NATS, reconnecting forever, with bounded timeouts for every step.

    The connection can still close for good (e.g. the server drops it for a protocol violation, and nats-py
    does not reconnect then); `closed` is set when it does, so the service can exit and be restarted.
    `seed_file`: an nkey seed file to log in with (a fleet hub requires one; a lone node's NATS does not).
    """

    client: NATS | None = None

    async def on_disconnect() -> None:
        if client is not None and client.is_closed:
            return  # nats-py calls this on our own close and drain too: nothing was lost
        log.warning("%s: disconnected from NATS; reconnecting", name)

    async def on_reconnect() -> None:
        log.info("%s: reconnected to NATS", name)

    async def on_error(exc: Exception) -> None:
        log.warning("%s: NATS error: %s", name, exc)

    async def on_closed() -> None:
        if closed is not None:
            closed.set()

    client = await nats.connect(
        url,
        name=name,
        connect_timeout=2,
        reconnect_time_wait=0.5,
        max_reconnect_attempts=-1,
        allow_reconnect=True,
        ping_interval=10,
        max_outstanding_pings=3,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        error_cb=on_error,
        closed_cb=on_closed,
        nkeys_seed=seed_file,
        pending_size=PENDING_BYTES,
    )
    return client


async def ensure_jetstream(js: JetStreamContext, node: str | None = None) -> dict[str, KeyValue]:
    """Create or update every stream and KV bucket (idempotent); return the buckets by name.

    With `node`, EDGEVM_EVENTS holds only that node's events. A fleet hub's EDGEVM_EVENTS (no event subjects
    of its own: it sources every node's) is left as it is.
    """
    for config in STREAMS:
        if config is EVENTS_STREAM:
            config = events_stream(node)
            with contextlib.suppress(NotFoundError):
                existing = (await js.stream_info(str(config.name))).config.subjects or []
                if _keeps(existing, node):
                    continue
        await _ensure_stream(js, config)
    buckets = {}
    for bucket in BUCKETS:
        buckets[bucket.name] = await _ensure_bucket(js, bucket)
    return buckets


def _keeps(existing: list[str], node: str | None) -> bool:
    """Return whether an existing EDGEVM_EVENTS is left as it is: a hub's (no event subjects of its own), or one
    that already stores the node's events (e.g. `edgevm.evt.>` from before fleets, or a server several test
    nodes share; no other node's events reach a fleet node's stream, its leaf link does not carry them)."""
    own = [subject for subject in existing if subject.startswith(subjects.EVENTS)]
    covering = (f"{subjects.EVENTS}.>", subjects.all_events(), subjects.all_events(node or "*"))
    return not own or any(subject in own for subject in covering)


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        # 10058: the stream exists with another configuration: bring it to ours.
        if exc.err_code != 10058:
            raise
        await js.update_stream(config)


async def _ensure_bucket(js: JetStreamContext, bucket: Bucket) -> KeyValue:
    config = KeyValueConfig(
        bucket=bucket.name, history=bucket.history, ttl=bucket.ttl or None, storage=StorageType.FILE
    )
    try:
        return await js.create_key_value(config)
    except BadRequestError as exc:
        if exc.err_code != 10058:
            raise
        return await js.key_value(bucket.name)


async def current_values(kv: KeyValue, pattern: str) -> dict[str, KeyValue.Entry]:
    """Return the current entry of every live key matching `pattern` (e.g. `<node>.*`), read in one pass."""
    # KeyValue.keys() filters by substring after reading every key; a subject-filtered watch reads only ours.
    watcher = await kv.watch(pattern, ignore_deletes=True)
    values: dict[str, KeyValue.Entry] = {}
    try:
        async for entry in watcher:
            if entry is None:
                break
            if entry.value and entry.key:
                values[entry.key] = entry
            if entry.delta == 0:
                break
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return values
