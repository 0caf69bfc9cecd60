"""A service's /metrics server (edgevm.shared.metrics.serve_metrics) under many connections: bounded threads."""

from __future__ import annotations

import http.client
import socket
import threading
import time

from prometheus_client import CollectorRegistry, Counter

from edgevm.shared.metrics import MAX_CONNECTIONS, serve_metrics


def scrape(port: int) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/metrics")
        reply = connection.getresponse()
        assert reply.status == 200
        return reply.read().decode()
    finally:
        connection.close()


def connection_threads() -> int:
    """Threads serving a metrics connection, in this process (other tests' servers' too)."""
    return sum("process_request_thread" in thread.name for thread in threading.enumerate())


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_past_the_limit_are_closed_and_scrapes_work_again_after() -> None:
    registry = CollectorRegistry()
    Counter("probes", "A family to serve.", registry=registry).inc()
    port = serve_metrics("127.0.0.1", 0, registry)
    threads_before = connection_threads()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.5)  # each accepted: a thread each, waiting for a request that does not come
        assert connection_threads() - threads_before <= MAX_CONNECTIONS
        extra = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        assert all(closed_by_server(sock) for sock in extra), "a connection past the limit was kept"
        for sock in extra:
            sock.close()
        assert connection_threads() - threads_before <= MAX_CONNECTIONS, "a thread per extra connection"
    finally:
        for sock in idle:
            sock.close()

    def scrapes() -> bool:
        try:
            return "probes_total 1.0" in scrape(port)
        except (OSError, http.client.HTTPException, AssertionError):
            return False

    deadline = time.monotonic() + 10
    while not scrapes():
        assert time.monotonic() < deadline, "no scrape served after the idle connections closed"
        time.sleep(0.1)


def test_a_request_that_is_too_big_is_refused_and_the_server_goes_on() -> None:
    registry = CollectorRegistry()
    Counter("probes", "A family to serve.", registry=registry).inc()
    port = serve_metrics("127.0.0.1", 0, registry)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(64).startswith(b"HTTP/1.1 414"), "an over-long request line was not refused"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n")
        sock.settimeout(5)
        assert sock.recv(64).startswith(b"HTTP/1.1 431"), "too many headers were not refused"
    assert "probes_total 1.0" in scrape(port)
