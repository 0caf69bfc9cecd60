"""edgevm.shared.textformat writes what prometheus_client's generate_latest writes, byte for byte."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    Summary,
    disable_created_metrics,
    enable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric, UnknownMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from edgevm.shared import textformat
from edgevm.shared.metrics import _loopback


class FixedFamilies(Collector):
    """Families a custom collector returns: timestamps, a gauge histogram, an untyped family, odd values."""

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("odd_values", "Values Go writes its own way.", labels=["case"])
        for case, value in [("inf", math.inf), ("minus_inf", -math.inf), ("nan", math.nan), ("big", 12345678.0),
                            ("huge", 1.5e300), ("tiny", 2.5e-9), ("negative_big", -98765432.1), ("int", 7)]:
            gauge.add_metric([case], value)
        gauge.add_metric(["stamped"], 1.0, timestamp=1700000000.123)
        yield gauge
        histogram = GaugeHistogramMetricFamily("queue_age_seconds", "A gauge histogram.", labels=["q"])
        histogram.add_metric(["jobs"], buckets=[("1.0", 2), ("+Inf", 5)], gsum_value=9.5)
        yield histogram
        untyped = UnknownMetricFamily("legacy_thing", "Help with a \\ backslash\nand a newline.")
        untyped.add_metric([], 3)
        yield untyped


def every_kind_of_metric() -> CollectorRegistry:
    registry = CollectorRegistry()
    counter = Counter("requests", "Requests.", ["path", "code"], registry=registry)
    counter.labels('/a"quoted"', "200").inc(3)
    counter.labels("back\\slash\nnewline", "500").inc()
    Gauge("temperature_celsius", "No labels.", registry=registry).set(-4.25)
    histogram = Histogram("latency_seconds", "A histogram.", ["endpoint"], registry=registry,
                          buckets=(0.0005, 0.001, 0.25, 1.0, 1e7))
    for endpoint, value in [("vm.start", 0.0004), ("vm.start", 0.3), ("vm.list", 20000000.0)]:
        histogram.labels(endpoint).observe(value)
    Counter("restarts", "No labels.", registry=registry).inc(2)
    Counter("never_used", "A labelled counter with no series yet.", ["why"], registry=registry)
    Histogram("plain_seconds", "A histogram without labels.", registry=registry).observe(2.5)
    below_zero = Histogram("offset_celsius", "Buckets below zero: no _sum.", ["room"], registry=registry,
                           buckets=(-10.0, 0.0, 10.0))
    below_zero.labels('north "wing"').observe(-3)
    Summary("size_bytes", "A summary.", registry=registry).observe(1024)
    Info("build", "An info.", registry=registry).info({"version": "1.2", "commit": "abc"})
    Enum("phase", "An enum (stateset).", states=["a", "b"], registry=registry).state("b")
    registry.register(FixedFamilies())
    return registry


def test_every_kind_of_metric_is_written_as_generate_latest_writes_it() -> None:
    registry = every_kind_of_metric()
    assert textformat.render(registry).encode() == generate_latest(registry)


def test_without_created_series_too() -> None:
    registry = every_kind_of_metric()
    disable_created_metrics()
    try:
        assert textformat.render(registry).encode() == generate_latest(registry)
    finally:
        enable_created_metrics()


def test_a_collector_that_is_not_a_registry_is_collected_as_a_whole() -> None:
    assert textformat.render(FixedFamilies()).encode() == generate_latest(FixedFamilies())  # type: ignore[arg-type]


def test_an_empty_registry_is_empty() -> None:
    assert textformat.render(CollectorRegistry()) == ""


@pytest.mark.parametrize(("value", "written"), [
    ("plain", "plain"), ('say "hi"', 'say \\"hi\\"'), ("a\\b", "a\\\\b"), ("two\nlines", "two\\nlines"),
])
def test_label_values_are_escaped_only_when_they_need_it(value: str, written: str) -> None:
    assert textformat.label_value(value) == written


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.5", False), ("192.168.1.9", False), ("fd00::1", False), ("::ffff:10.0.0.5", False), ("", False),
])
def test_only_scrapers_off_the_host_get_gzip(address: str, loopback: bool) -> None:
    assert _loopback(address) is loopback


def test_numbers_are_written_as_go_writes_them() -> None:
    rng = random.Random(7)
    values = [0.0, -0.0, 1, 5, 999999.9999, 1e6, -1e6, 1e6 - 1e-9, 123456.5, 1234567.0, 2.5e-9, -98765432.1,
              math.inf, -math.inf, math.nan, 1.5e300, 5e-324]
    values += [rng.uniform(-1, 1) * 10 ** rng.randint(-12, 12) for _ in range(5000)]
    for value in values:
        assert textformat._number(value) == floatToGoString(value), value
