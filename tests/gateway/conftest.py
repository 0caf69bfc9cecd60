"""Fixtures of the gateway tests: two simulated nodes publishing on the session's nats-server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NATS

from edgevm.shared.bus import ensure_jetstream
from tests.gateway.nodes import FakeNode


@pytest.fixture
async def fleet(nc: NATS) -> AsyncIterator[tuple[FakeNode, FakeNode]]:
    """Nodes a<tag> and b<tag>, not beating yet; their heartbeats stop at the end."""
    await ensure_jetstream(nc.jetstream())
    tag = uuid.uuid4().hex[:6]
    nodes = (FakeNode(nc, f"a{tag}"), FakeNode(nc, f"b{tag}"))
    yield nodes
    for node in nodes:
        if node.beating is not None and not node.beating.done():
            await node.stop_beating()
