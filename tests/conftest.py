"""Session fixtures shared by every test: a real nats-server with JetStream on a free port."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import nats
import pytest
from nats.aio.client import Client as NATS

from edgevm.cli.natsserver import NatsServer, free_port, start_nats_server


@pytest.hookimpl(trylast=True)  # after the folders' conftests marked their tests and `-m` deselected
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A run that selects tests needing root fails at once when not root: skipping them would pass, proving nothing."""
    if os.geteuid() == 0:
        return
    needing = [item for item in items if item.get_closest_marker("root") is not None]
    if needing:
        raise pytest.UsageError(
            f"{len(needing)} of the {len(items)} selected tests need root (network namespaces, nftables, conntrack, "
            f"libvirt), e.g. {needing[0].nodeid}; this run is uid {os.geteuid()}. Run them as root "
            "(`sudo make test`), or leave them out on purpose with -m 'not root'."
        )


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
