"""Prometheus metrics shared by every service: the command and task metrics, and each service's HTTP endpoint."""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Generic, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from edgevm.shared import textformat

T = TypeVar("T")
log = logging.getLogger(__name__)
SCRAPE_TIMEOUT = 5.0

COMMANDS = Counter(
    "edgevm_commands_total",
    "Commands answered, by service, endpoint and reply code.",
    ["service", "endpoint", "code"],
)
COMMAND_DURATION = Histogram(
    "edgevm_command_duration_seconds",
    "Time from a command's arrival to its reply.",
    ["service", "endpoint"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0),
)
EVENTS_PUBLISHED = Counter(
    "edgevm_events_published_total",
    "Events published and stored by JetStream, by service and event type.",
    ["service", "type"],
)
EVENTS_UNACKED = Counter(
    "edgevm_events_unacked_total",
    "Events JetStream did not acknowledge in time (or refused), by service and event type.",
    ["service", "type"],
)

# Tasks, counted by the TaskStore that writes them (so by whichever service runs them).
TASKS_FINISHED = Counter(
    "edgevm_tasks",
    "Tasks that ended, by node, VM (\"\" for none), kind and outcome (succeeded, failed, cancelled).",
    ["node", "vm", "kind", "outcome"],
)
TASK_DURATION = Histogram(
    "edgevm_task_duration_seconds",
    "Time from a task's creation to its end, by node and kind.",
    ["node", "kind"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0),
)
TASKS_ACTIVE = Gauge(
    "edgevm_tasks_active",
    "Tasks of this process not ended yet, by node, kind and status (queued, running).",
    ["node", "kind", "status"],
)


TextSource = Callable[[], str]


class Exposition:
    """What a service's /metrics serves: its registry, then text sources, in the text format 0.0.4.

    A text source renders whole families itself (HELP, TYPE and samples, each line ending in a newline), for
    figures with series per VM: prometheus_client formats each series at about 6 us, which made a scrape of
    1,000 VMs several times as long as the libvirt call that read them.
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self._sources: list[TextSource] = []

    def add(self, source: TextSource) -> None:
        """Serve `source`'s families after the registry's (its names must be its own)."""
        self._sources.append(source)

    def remove(self, source: TextSource) -> None:
        """Stop serving `source`."""
        self._sources.remove(source)

    def render(self) -> bytes:
        """The whole exposition, as a scrape gets it."""
        return (textformat.render(self.registry) + "".join(source() for source in list(self._sources))).encode()


EXPOSITION = Exposition()


IDLE_TIMEOUT = 600.0  # seconds a kept-alive scrape connection may stay idle (Prometheus keeps its own 5 minutes)
# Connections served at once (a thread each). A few scrapers need a few; the rest are closed when accepted.
MAX_CONNECTIONS = 32


def _loopback(address: str) -> bool:
    """Whether the scraper is on this host: then the body is sent as it is.

    Measured on 1,000 running VMs' 1.4 MB: gzip level 1 takes 2.4 ms (to 63 KB; level 6: 6.4 ms, to 59 KB),
    longer than loopback takes to carry it; across a node's uplink the 20-fold smaller body is worth it.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class _ScrapeHandler(BaseHTTPRequestHandler):
    """Answers every GET (HEAD) with the exposition, over HTTP/1.1 connections kept alive between scrapes.

    Prometheus keeps its connection to a target open from one scrape to the next: a scrape then costs
    neither a TCP connection nor a new thread here (a server that closed each one, as wsgiref's HTTP/1.0
    does, made Prometheus reconnect every time).
    """

    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT
    disable_nagle_algorithm = True  # the body's last segment would wait for the ACK of the headers' segment
    exposition: Exposition

    def do_GET(self) -> None:
        self._answer(body_too=True)

    def do_HEAD(self) -> None:
        self._answer(body_too=False)

    def _answer(self, *, body_too: bool) -> None:
        try:
            body = self.exposition.render()
        except Exception:
            log.exception("metrics not rendered for a scrape")
            self.send_error(500, "The metrics could not be rendered; the service log says why.")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)
        if "gzip" in self.headers.get("Accept-Encoding", "") and not _loopback(self.client_address[0]):
            body = gzip.compress(body, compresslevel=1)
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body_too:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing: Prometheus scrapes every few seconds."""


def serve_metrics(host: str, port: int, registry: CollectorRegistry = REGISTRY) -> int:
    """Start the metrics HTTP server in a daemon thread; return the port it listens on (port 0: any)."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingHTTPServer):
        """A thread per connection, on the listening address's family (IPv4 or IPv6), MAX_CONNECTIONS at most."""

        address_family = family
        _open = threading.BoundedSemaphore(MAX_CONNECTIONS)

        def verify_request(self, request: Any, client_address: Any) -> bool:
            # Past the limit a connection is closed at once: idle connections, however many a client opens,
            # cost the service at most MAX_CONNECTIONS threads.
            return self._open.acquire(blocking=False)

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self._open.release()

        def handle_error(self, request: Any, client_address: Any) -> None:
            log.debug("metrics connection from %s ended with an error", client_address, exc_info=True)

    class Handler(_ScrapeHandler):
        exposition = EXPOSITION if registry is REGISTRY else Exposition(registry)

    server = Server((str(address[0]), port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return int(server.server_address[1])


def on_loop(call: Callable[[], Awaitable[T]], loop: asyncio.AbstractEventLoop,
            timeout: float = SCRAPE_TIMEOUT) -> Callable[[], T]:
    """A blocking function for a collector on the scrape thread: awaits `call()` on the service's event loop."""

    async def run() -> T:
        return await call()

    def blocking() -> T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError("a scrape-time read must run on the scrape thread, not on the loop it waits for")
        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout)

    return blocking


class CachedRead(Generic[T]):
    """A blocking read shared by the scrapes of `max_age` seconds.

    The scrape that finds no fresh value reads, on its own thread; scrapes that come meanwhile wait for that
    read, up to `timeout` seconds (then TimeoutError), rather than read again: a hung libvirt holds one thread,
    not one more per scrape. A read's exception reaches every scrape that waited for it and is not kept.
    """

    def __init__(self, read: Callable[[], T], max_age: float, timeout: float = SCRAPE_TIMEOUT) -> None:
        self._read = read
        self._max_age = max_age
        self._timeout = timeout
        self._lock = threading.Lock()
        self._cached: tuple[float, T, float] | None = None  # (read at, value, seconds the read took)
        self._pending: Future[tuple[T, float]] | None = None

    def __call__(self) -> tuple[T, float]:
        """Return the value and the seconds its read took."""
        with self._lock:
            cached = self._cached
            if cached is not None and time.monotonic() - cached[0] < self._max_age:
                return cached[1], cached[2]
            pending = self._pending
            if pending is None:
                mine: Future[tuple[T, float]] = Future()
                self._pending = mine
        if pending is not None:
            return pending.result(self._timeout)
        started = time.monotonic()
        try:
            value = self._read()
        except BaseException as exc:
            with self._lock:
                self._pending = None
            mine.set_exception(exc)
            raise
        ended = time.monotonic()
        with self._lock:
            self._pending = None
            self._cached = (ended, value, ended - started)
        mine.set_result((value, ended - started))
        return value, ended - started
