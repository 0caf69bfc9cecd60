"""Liveness: every service says every 10 s that it runs on its node, in a `node.heartbeat` event."""

from __future__ import annotations

import asyncio
import logging
import os

from edgevm.shared.clock import now
from edgevm.shared.events import Heartbeat
from edgevm.shared.publisher import EventPublisher

log = logging.getLogger(__name__)
INTERVAL = 10.0


def host_memory_bytes() -> int:
    """Return the host's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


async def beat_forever(publisher: EventPublisher, node: str, service: str, interval: float = INTERVAL) -> None:
    """Publish a heartbeat for `service` now and then every `interval` seconds until cancelled."""
    cpus, memory = os.cpu_count() or 1, host_memory_bytes()
    while True:
        try:
            await publisher.publish(
                Heartbeat(at=now(), node=node, services=[service], cpus=cpus, memory_bytes=memory)
            )
        except Exception as exc:  # NATS away: the next beat will tell
            log.warning("heartbeat not published: %s", exc)
        await asyncio.sleep(interval)
