"""The life of a service process: connect, set up JetStream, serve commands and metrics, stop cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from edgevm.shared import subjects
from edgevm.shared.background import Background
from edgevm.shared.bus import connect, ensure_jetstream
from edgevm.shared.config import Config
from edgevm.shared.endpoint import CommandService, Handler
from edgevm.shared.heartbeat import beat_forever
from edgevm.shared.metrics import serve_metrics
from edgevm.shared.publisher import EventPublisher

log = logging.getLogger(__name__)


@dataclass
class ServiceContext:
    """What a service's set-up gets: its config, NATS, JetStream, buckets, publisher and command service."""

    name: str
    config: Config
    nc: NATS
    js: JetStreamContext
    buckets: dict[str, KeyValue]
    publisher: EventPublisher
    commands: CommandService
    stack: contextlib.AsyncExitStack
    metrics_port: int = 0
    tasks: Background = field(init=False)

    def __post_init__(self) -> None:
        self.tasks = Background(f"edgevm-{self.name}")

    async def command(self, verb: str, handler: Handler, deadline: float = 2.0, inline: bool = False) -> None:
        """Serve `handler` as command `verb` of this node (`edgevm.<node>.<verb>`); see CommandService.add."""
        await self.commands.add(
            subjects.command(self.config.node, verb), handler, verb=verb, deadline=deadline, inline=inline
        )

    def background(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run `coro` for the life of the service; it is cancelled (and awaited) at shutdown, a failure logged."""
        return self.tasks.start(_logged(coro, name), name, log_failure=False)

    async def stop_background(self) -> None:
        """Cancel the background tasks and wait for them to end."""
        await self.tasks.close()


async def _logged(coro: Coroutine[Any, Any, Any], name: str) -> Any:
    # The failure is reported here, once; the task then ends quietly (None), so no "exception was never
    # retrieved" traceback follows it when nobody awaits the task.
    try:
        return await coro
    except asyncio.CancelledError:
        raise
    except nats.errors.ConnectionClosedError:
        log.warning("background task %s ended: the NATS connection is closed", name)
    except Exception:
        log.exception("background task %s failed", name)
    return None


Setup = Callable[[ServiceContext], Awaitable[None]]


class ServiceStopped(Exception):
    """The service was asked to stop before it was up."""


class ConnectionLost(Exception):
    """The service's NATS connection closed for good: the process must exit (non-zero) to be restarted."""


async def connect_when_ready(url: str, name: str, stop: asyncio.Event, closed: asyncio.Event | None = None,
                             seed_file: str | None = None) -> NATS:
    """Connect to NATS, retrying with backoff while the server is not up yet (e.g. during node start).

    `closed` is set if the connection later closes for good (see bus.connect); `seed_file` logs in with nkeys.
    """
    delay = 0.2
    while True:
        # A connect attempt can itself retry for long (nats-py keeps trying an unreachable server):
        # race it with `stop`, so SIGTERM ends a service that never reached NATS.
        attempt = asyncio.ensure_future(connect(url, name, closed, seed_file))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({attempt, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not attempt.done():
            attempt.cancel()
            with contextlib.suppress(BaseException):
                await attempt
            raise ServiceStopped(f"{name}: stopped before NATS at {url} was reached")
        try:
            return attempt.result()
        except Exception as exc:
            if stop.is_set():
                raise
            log.info("%s: NATS at %s not ready (%s); retrying in %.1f s", name, url, exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 5.0)


async def serve(name: str, setup: Setup, config: Config | None = None, stop: asyncio.Event | None = None) -> None:
    """Run service `name` until `stop` is set (or SIGTERM/SIGINT when run as a process).

    Raise ConnectionLost when the NATS connection closes for good while serving.
    """
    config = config or Config.from_env()
    stop = stop or asyncio.Event()
    closed = asyncio.Event()
    try:
        nc = await connect_when_ready(config.nats_url, f"edgevm-{name}@{config.node}", stop, closed,
                                      config.nats_seed_file)
    except ServiceStopped as exc:
        log.info("%s", exc)
        return
    js = nc.jetstream(timeout=5)
    async with contextlib.AsyncExitStack() as stack:
        buckets = await ensure_jetstream(js, config.node)
        publisher = EventPublisher(js, config.node, name)
        commands = CommandService(nc, f"edgevm-{name}", description=f"edgevm {name} on {config.node}")
        ctx = ServiceContext(name, config, nc, js, buckets, publisher, commands, stack)
        ctx.metrics_port = serve_metrics(config.metrics_host, config.metrics_port_for(name))
        await setup(ctx)
        await commands.start()  # only now does $SRV.PING list the service: every command answers
        ctx.background(beat_forever(publisher, config.node, name), "heartbeat")
        log.info(
            "edgevm-%s serving node %s on %s; metrics on http://%s:%d/metrics",
            name, config.node, config.nats_url, config.metrics_host, ctx.metrics_port,
        )
        await _first(stop, closed)
        if closed.is_set() and not stop.is_set():
            log.error("edgevm-%s: the NATS connection closed for good (%s); exiting", name, nc.last_error)
            # The stack's callbacks would undo subscriptions of a closed connection (and fail): the process ends.
            stack.pop_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.stop_background(), 10)
            raise ConnectionLost(f"edgevm-{name}: the NATS connection closed for good")
        log.info("edgevm-%s stopping", name)
        await commands.stop()
        await ctx.stop_background()
    await publisher.flush()  # after the stack: its callbacks (e.g. draining tasks) publish too
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.drain(), 5)
    log.info("edgevm-%s stopped", name)


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def main(name: str, setup: Setup) -> None:
    """Entry point of a service process: logging, signals, and `serve` until SIGTERM or Ctrl-C."""
    config = Config.from_env()
    logging.basicConfig(
        level=config.log_level, format=f"%(asctime)s edgevm-{name} %(levelname)s %(name)s: %(message)s"
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # SIGHUP too: a terminal that closes sends it to `node up` and the services it runs in the foreground.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve(name, setup, config, stop)
        except ConnectionLost:
            # Exit non-zero, so `edgevm node up` or systemd starts the service again on a fresh connection. At
            # once: asyncio.run would wait for every task to end, and a task waiting on the closed connection
            # may never see its cancellation (nats-py turns it into ConnectionClosedError).
            logging.shutdown()
            os._exit(1)

    asyncio.run(run())
