"""Scrape-time reads (edgevm.shared.metrics.CachedRead): one read at a time, shared, bounded by a deadline."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from edgevm.shared.metrics import CachedRead


class Gate:
    """A read that blocks until the test opens the gate, counting how often it was called."""

    def __init__(self, value: int = 7) -> None:
        self.calls = 0
        self.value = value
        self.opened = threading.Event()
        self.error: Exception | None = None

    def __call__(self) -> int:
        self.calls += 1
        self.opened.wait(10)
        if self.error is not None:
            raise self.error
        return self.value


def test_scrapes_during_a_read_wait_for_it_and_the_next_ones_are_served_from_the_cache() -> None:
    read = Gate()
    cached = CachedRead(read, max_age=60)
    with ThreadPoolExecutor(4) as pool:
        scrapes = [pool.submit(cached) for _ in range(4)]
        time.sleep(0.2)
        read.opened.set()
        assert [scrape.result(5)[0] for scrape in scrapes] == [7, 7, 7, 7]
    assert read.calls == 1, "concurrent scrapes each read"
    assert cached()[0] == 7 and read.calls == 1, "a scrape within max_age read again"


def test_a_failed_read_reaches_every_waiting_scrape_and_is_not_kept() -> None:
    read = Gate()
    read.error = OSError("libvirt did not answer")
    cached = CachedRead(read, max_age=60)
    with ThreadPoolExecutor(3) as pool:
        scrapes = [pool.submit(cached) for _ in range(3)]
        time.sleep(0.2)
        read.opened.set()
        for scrape in scrapes:
            with pytest.raises(OSError, match="did not answer"):
                scrape.result(5)
    read.error = None
    assert cached()[0] == 7 and read.calls == 2, "the failed read was kept"


def test_scrapes_give_up_on_a_hung_read_without_reading_again_behind_it() -> None:
    read = Gate()
    cached = CachedRead(read, max_age=0, timeout=0.1)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(cached)  # this scrape's thread does the read, and hangs in it
        time.sleep(0.1)
        for _ in range(3):
            with pytest.raises(TimeoutError):
                cached()
        assert read.calls == 1, "each scrape read again behind the hung one"
        read.opened.set()  # libvirt answers at last
        assert first.result(5)[0] == 7
    assert cached()[0] == 7 and read.calls == 2, "a read after max_age was not made"


def test_the_read_time_is_the_reads_own() -> None:
    def read() -> int:
        time.sleep(0.05)
        return 1

    value, took = CachedRead(read, max_age=60)()
    assert value == 1 and 0.05 <= took < 1
