"""The hub's watch over its sources: a source left idle while its node answers is started again.

nats-server (2.15) re-creates a source's consumer on its own, but slowly after an outage: a consumer request
sent while the node was away waits out a fixed 30 s before it counts as failed, then each failure adds 10 s of
backoff (up to 2 min); a leaf that reconnects meanwhile does not cut that short. So after a long cut, or a hub
restart during one, the hub could sit idle 30-150 s with the node back. This watch sees such a source (no
heartbeat from it, which a live source sends every second) while the node's JetStream answers, and removes and
re-adds it: the server then starts it at once after the last event the hub holds of that node (it finds that
event by its Nats-Stream-Source header), so nothing is lost or taken twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from edgevm.cli.sourcing import node_of_api
from edgevm.shared.bus import EVENTS_STREAM

log = logging.getLogger("edgevm.hub")
STREAM = str(EVENTS_STREAM.name)
IDLE = 5.0  # seconds without a heartbeat from a source (it sends one every second when it runs)
CHECK_EVERY = 2.0
KICK_AGAIN_AFTER = 15.0


async def _api(nc: NATS, subject: str, body: dict[str, Any] | None = None, timeout: float = 2.0) -> dict[str, Any]:
    msg = await nc.request(subject, json.dumps(body).encode() if body is not None else b"", timeout=timeout)
    reply: dict[str, Any] = json.loads(msg.data)
    if "error" in reply:
        raise RuntimeError(f"{subject}: {reply['error'].get('description')}")
    return reply


def idle_sources(info: dict[str, Any]) -> list[str]:
    """Return the nodes whose source in a STREAM.INFO reply has not been heard from for IDLE seconds."""
    idle = []
    for source in info.get("sources") or []:
        node = source_node_of(source)
        active = source.get("active", -1)  # nanoseconds since the source was last heard from; -1: never
        if node is not None and (active < 0 or active > IDLE * 1e9):
            idle.append(node)
    return idle


def source_node_of(source: dict[str, Any]) -> str | None:
    """Return the node a source entry of a STREAM.INFO reply reads from."""
    return node_of_api((source.get("external") or {}).get("api"))


async def node_answers(nc: NATS, node: str) -> bool:
    """Return whether node `node`'s JetStream answers through the leaf link right now."""
    try:
        await _api(nc, f"$JS.{node}.API.STREAM.INFO.{STREAM}", timeout=1.0)
    except (NatsError, RuntimeError, TimeoutError):
        return False
    return True


async def restart_source(nc: NATS, node: str) -> None:
    """Remove node `node`'s source from the hub's stream and add it again (the server resumes it at once)."""
    config = (await _api(nc, f"$JS.API.STREAM.INFO.{STREAM}"))["config"]
    sources = config.get("sources") or []
    kept = [s for s in sources if source_node_of(s) != node]
    if len(kept) == len(sources):
        return
    await _api(nc, f"$JS.API.STREAM.UPDATE.{STREAM}", {**config, "sources": kept})
    await _api(nc, f"$JS.API.STREAM.UPDATE.{STREAM}", {**config, "sources": sources})


async def watch_sources(nc: NATS) -> None:
    """Every CHECK_EVERY s, restart a source idle on two checks in a row whose node answers; until cancelled."""
    suspects: set[str] = set()
    kicked: dict[str, float] = {}
    while True:
        await asyncio.sleep(CHECK_EVERY)
        try:
            idle = set(idle_sources(await _api(nc, f"$JS.API.STREAM.INFO.{STREAM}")))
            for node in sorted(idle & suspects):
                if time.monotonic() - kicked.get(node, -KICK_AGAIN_AFTER) < KICK_AGAIN_AFTER:
                    continue
                if await node_answers(nc, node):
                    log.info("source of node %s idle while the node answers: starting it again", node)
                    await restart_source(nc, node)
                    kicked[node] = time.monotonic()
            suspects = idle
        except (NatsError, RuntimeError, TimeoutError, KeyError) as exc:
            log.warning("watching the event sources: %s", exc)
