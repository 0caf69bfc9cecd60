"""The active-flows gauge, counted on the event loop that owns the tables when Prometheus scrapes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["ActiveFlowsCollector"]

log = logging.getLogger(__name__)
SCRAPE_TIMEOUT = 2.0


class ActiveFlowsCollector(Collector):
    """Active flows per VM. The tables change on the event loop only, so the scrape (on the HTTP server's
    thread) asks the loop to count, and waits for the counts: nothing to keep up on the event path."""

    def __init__(self, counts: Callable[[], dict[str, int]], loop: asyncio.AbstractEventLoop) -> None:
        self._counts = counts
        self._loop = loop

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the gauge (none if the loop does not count in time)."""
        try:
            counts = self._counted()
        except (RuntimeError, TimeoutError, concurrent.futures.TimeoutError) as exc:
            log.warning("active flows not counted for the scrape: %s", exc)
            return
        gauge = GaugeMetricFamily("edgevm_flowwatch_active_flows", "Active flows, by VM.", labels=["vm"])
        for vm, count in sorted(counts.items()):
            gauge.add_metric([vm], count)
        yield gauge

    def _counted(self) -> dict[str, int]:
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            return self._counts()
        done: concurrent.futures.Future[dict[str, int]] = concurrent.futures.Future()

        def count() -> None:
            try:
                done.set_result(self._counts())
            except BaseException as exc:  # handed to the scraping thread
                done.set_exception(exc)

        self._loop.call_soon_threadsafe(count)
        return done.result(SCRAPE_TIMEOUT)
