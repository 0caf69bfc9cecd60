"""Scrape-time reads (edgevm.shared.metrics): shared by concurrent scrapes, begun before the registry is rendered."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgevm.shared.metrics import CachedRead, Exposition, ready


class Manual:
    """A start function whose reads end when the test says so."""

    def __init__(self) -> None:
        self.futures: list[Future[int]] = []

    def __call__(self) -> Future[int]:
        future: Future[int] = Future()
        self.futures.append(future)
        return future


def test_concurrent_scrapes_share_the_read_in_flight() -> None:
    start = Manual()
    read = CachedRead(start, max_age=60)
    first, second = read.begin(), read.begin()
    assert len(start.futures) == 1, "the second scrape began a read of its own"
    start.futures[0].set_result(7)
    assert first()[0] == second()[0] == 7
    assert read()[0] == 7 and len(start.futures) == 1, "a read within max_age was not served from the cache"


def test_a_failed_read_is_not_cached_and_the_next_scrape_reads_again() -> None:
    start = Manual()
    read = CachedRead(start, max_age=60)
    waiting = read.begin()
    start.futures[0].set_exception(TimeoutError("libvirt did not answer"))
    with pytest.raises(TimeoutError):
        waiting()
    again = read.begin()
    assert len(start.futures) == 2
    start.futures[1].set_result(3)
    assert again()[0] == 3


def test_scrapes_time_out_on_a_hung_read_without_queueing_more_reads_behind_it() -> None:
    start = Manual()
    read = CachedRead(start, max_age=0, timeout=0.05)
    for _ in range(3):
        with pytest.raises(TimeoutError):
            read()
    assert len(start.futures) == 1, "each scrape queued another read behind the hung one"
    start.futures[0].set_result(4)  # libvirt answers at last
    assert read()[0] == 4
    read.begin()
    assert len(start.futures) == 2, "a read after max_age did not read again"


def test_a_start_that_fails_at_once_fails_the_read() -> None:
    def start() -> Future[int]:
        raise RuntimeError("cannot schedule new futures after shutdown")

    read = CachedRead(start, max_age=60)
    with pytest.raises(RuntimeError, match="shutdown"):
        read()


def test_the_read_time_is_the_reads_own_not_the_scrapes() -> None:
    start = Manual()
    read = CachedRead(start, max_age=60)
    waiting = read.begin()
    time.sleep(0.02)
    start.futures[0].set_result(1)
    time.sleep(0.2)  # the scrape renders other things before it asks for the result
    _value, took = waiting()
    assert 0.02 <= took < 0.2


def test_a_blocking_read_keeps_its_exception() -> None:
    def fails() -> int:
        raise OSError("gone")

    with pytest.raises(OSError, match="gone"):
        ready(fails)().result(0)
    assert ready(lambda: 5)().result(0) == 5


class Recorded(Collector):
    """A registry collector that notes when the registry is rendered."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def collect(self) -> Iterator[Metric]:
        self.log.append("registry")
        yield GaugeMetricFamily("recorded", "Rendered.", value=1)


def test_sources_begin_before_the_registry_is_rendered_and_write_after_it() -> None:
    log: list[str] = []
    registry = CollectorRegistry()
    registry.register(Recorded(log))
    exposition = Exposition(registry)

    def source() -> Callable[[], str]:
        log.append("begin")

        def write() -> str:
            log.append("write")
            return "# HELP text_source A source.\n# TYPE text_source gauge\ntext_source 2\n"

        return write

    exposition.add(source)
    body = exposition.render().decode()
    assert log == ["begin", "registry", "write"]
    assert body.index("recorded 1.0") < body.index("text_source 2")
    exposition.remove(source)
    assert "text_source" not in exposition.render().decode()
