"""A node's EDGEVM_EVENTS stores its own events only; a fleet hub's sourcing stream is left alone."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig

from edgevm.cli.natsserver import free_port, start_nats_server
from edgevm.shared.bus import ensure_jetstream


@pytest.fixture
async def fresh() -> AsyncIterator[NATS]:
    """A nats-server of the test's own (the session's is shared by tests of many node ids)."""
    store = Path(tempfile.mkdtemp(prefix="edgevm-t-stream-"))
    server = start_nats_server(store, port=free_port())
    nc = await nats.connect(server.url)
    try:
        yield nc
    finally:
        await nc.close()
        server.stop()
        shutil.rmtree(store, ignore_errors=True)


async def subjects_of(nc: NATS) -> list[str]:
    return (await nc.jetstream().stream_info("EDGEVM_EVENTS")).config.subjects or []


async def test_a_node_stores_its_own_events_only(fresh: NATS) -> None:
    await ensure_jetstream(fresh.jetstream(), "n1")
    assert await subjects_of(fresh) == ["edgevm.evt.n1.>"]
    js = fresh.jetstream()
    assert (await js.publish("edgevm.evt.n1.vm.web", b"{}")).stream == "EDGEVM_EVENTS"
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await js.publish("edgevm.evt.n2.vm.web", b"{}")


async def test_a_stream_that_already_stores_the_nodes_events_is_kept(fresh: NATS) -> None:
    await ensure_jetstream(fresh.jetstream())  # edgevm.evt.> (before fleets; a server test nodes share)
    await ensure_jetstream(fresh.jetstream(), "n1")
    assert await subjects_of(fresh) == ["edgevm.evt.>"]


async def test_a_hubs_sourcing_stream_is_left_alone(fresh: NATS) -> None:
    js = fresh.jetstream()
    await js.add_stream(StreamConfig(name="EDGEVM_EVENTS", subjects=[]))  # no event subjects of its own
    await ensure_jetstream(js, "hub")
    assert not any(s.startswith("edgevm.evt") for s in await subjects_of(fresh))
