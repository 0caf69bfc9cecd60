"""Session fixtures shared by every test: a real nats-server with JetStream on a free port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import nats
import pytest
from nats.aio.client import Client as NATS

from edgevm.cli.natsserver import NatsServer, free_port, start_nats_server


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server with JetStream for the whole session, on a free loopback port."""
    server = start_nats_server(tmp_path_factory.mktemp("nats"), port=free_port())
    yield server
    server.stop()


@pytest.fixture(scope="session")
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    """A NATS connection for the test's own requests and subscriptions."""
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.drain()
