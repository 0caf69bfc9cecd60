"""The Prometheus text format 0.0.4 of a registry: prometheus_client's `generate_latest`, byte for byte, faster.

`generate_latest` validates and escapes every label name of every sample again, at about 8 us a sample: a
service's few hundred series (mostly command-latency histogram buckets) took longer to format than libvirt
took to read a thousand VMs. Names are looked up once here; label values are escaped only when they need it.

prometheus_client's own counters, gauges and histograms are read here directly, not through `collect()`,
which builds a dict and a tuple for every sample (a histogram's buckets are most of a service's samples):
each series' text up to its value is written once and kept. That reads attributes of prometheus_client that
are not its public API (`_metrics`, `_value`, `_buckets`, ...); the version is pinned in uv.lock, and
tests/unit/test_textformat.py holds the output to `generate_latest`'s for every kind of metric.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, cast

import prometheus_client.metrics
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import escape_label_name, escape_metric_name
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

__all__ = ["label_value", "render"]

_go_float = cast(Callable[[float], str], floatToGoString)  # a value as Go writes it, as Prometheus expects


def _number(value: float) -> str:
    """floatToGoString, without its checks for the values that need none: Go and Python write a finite
    number under a million alike (Go switches to an exponent sooner above it; infinities and NaN differ)."""
    value = float(value)
    return repr(value) if -1e6 < value < 1e6 else _go_float(value)


@functools.lru_cache(maxsize=256)
def _bounds(upper_bounds: tuple[float, ...]) -> tuple[tuple[str, str], ...]:
    """A histogram's `le` labels."""
    return tuple(("le", _go_float(bound)) for bound in upper_bounds)
# prometheus_client's metric types as the text format 0.0.4 writes them: type -> (suffix of the name, TYPE).
_TYPES = {
    "counter": ("_total", "counter"),
    "info": ("_info", "gauge"),
    "stateset": ("", "gauge"),
    "gaugehistogram": ("", "histogram"),
    "unknown": ("", "untyped"),
}
# OpenMetrics samples with no place in a 0.0.4 family: each suffix becomes a gauge family after its family.
_APART = ("_created", "_gsum", "_gcount")


@functools.lru_cache(maxsize=4096)
def _metric_name(name: str) -> str:
    return escape_metric_name(name)


@functools.lru_cache(maxsize=4096)
def _label_name(name: str) -> str:
    return escape_label_name(name)


def label_value(value: str) -> str:
    """A label value as the text format writes it between its quotes."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def _help(documentation: str) -> str:
    return documentation.replace("\\", "\\\\").replace("\n", "\\n")


def _line(sample: Sample) -> str:
    if sample.labels:
        labels = ",".join([f'{_label_name(k)}="{label_value(v)}"' for k, v in sorted(sample.labels.items())])
        line = f"{_metric_name(sample.name)}{{{labels}}} {_number(sample.value)}"
    else:
        line = f"{_metric_name(sample.name)} {_number(sample.value)}"
    if sample.timestamp is not None:
        line += f" {int(float(sample.timestamp) * 1000):d}"  # in milliseconds
    return line + "\n"


def render(registry: Collector) -> str:
    """Every family `registry` collects, in the text format 0.0.4 (as `generate_latest(registry)` decodes)."""
    output: list[str] = []
    direct = values.ValueClass is values.MutexValue  # not prometheus_client's multiprocess mode
    for collector in _collectors(registry):
        write = _DIRECT.get(type(collector)) if direct else None
        if write is not None:
            write(collector, output)
        else:
            for metric in collector.collect():
                _family(metric, output)
    return "".join(output)


def _collectors(registry: Collector) -> Sequence[Collector]:
    """The registry's collectors, in `CollectorRegistry.collect()`'s order; one with target info as a whole."""
    if type(registry) is CollectorRegistry and not registry._target_info:
        with registry._lock:
            return list(registry._collector_to_names)
    return [registry]


def _family(metric: Metric, output: list[str]) -> None:
    suffix, kind = _TYPES.get(metric.type, ("", metric.type))
    name = _metric_name(metric.name + suffix)
    output.append(f"# HELP {name} {_help(metric.documentation)}\n# TYPE {name} {kind}\n")
    apart_names = [metric.name + apart for apart in _APART]
    apart: dict[str, list[str]] = {}
    for sample in metric.samples:
        if sample.name in apart_names:
            apart.setdefault(sample.name, []).append(_line(sample))
        else:
            output.append(_line(sample))
    for apart_name, lines in sorted(apart.items()):
        name = _metric_name(apart_name)
        output.append(f"# HELP {name} {_help(metric.documentation)}\n# TYPE {name} gauge\n")
        output.extend(lines)


def _children(wrapper: Any) -> list[tuple[tuple[str, ...], Any]]:
    """(label values, child) of a prometheus_client metric: its children, or itself when it has no labels."""
    if wrapper._labelnames and not wrapper._labelvalues:
        with wrapper._lock:
            return list(wrapper._metrics.items())
    return [((), wrapper)]


@functools.lru_cache(maxsize=65536)
def _series(name: str, labelnames: tuple[str, ...], labelvalues: tuple[str, ...], extra: tuple[str, str] | None) -> str:
    """A series' text up to its value: its name and labels (sorted, as generate_latest sorts them)."""
    pairs = list(zip(labelnames, labelvalues, strict=True))
    if extra is not None:
        pairs.append(extra)
    if not pairs:
        return f"{_metric_name(name)} "
    labels = ",".join([f'{_label_name(k)}="{label_value(v)}"' for k, v in sorted(pairs)])
    return f"{_metric_name(name)}{{{labels}}} "


def _header(name: str, documentation: str, kind: str) -> str:
    name = _metric_name(name)
    return f"# HELP {name} {_help(documentation)}\n# TYPE {name} {kind}\n"


def _created_family(wrapper: Any, children: list[tuple[tuple[str, ...], Any]], output: list[str]) -> None:
    if not children or not prometheus_client.metrics._use_created:
        return
    name = wrapper._name + "_created"
    output.append(_header(name, wrapper._documentation, "gauge"))
    output.extend([f"{_series(name, wrapper._labelnames, labels, None)}{_number(child._created)}\n"
                   for labels, child in children])


def _write_counter(counter: Any, output: list[str]) -> None:
    name = counter._name + "_total"
    output.append(_header(name, counter._documentation, "counter"))
    children = _children(counter)
    output.extend([f"{_series(name, counter._labelnames, labels, None)}{_number(child._value.get())}\n"
                   for labels, child in children])
    _created_family(counter, children, output)


def _write_gauge(gauge: Any, output: list[str]) -> None:
    name = gauge._name
    output.append(_header(name, gauge._documentation, "gauge"))
    output.extend([f"{_series(name, gauge._labelnames, labels, None)}{_number(child._value.get())}\n"
                   for labels, child in _children(gauge)])


def _write_histogram(histogram: Any, output: list[str]) -> None:
    name = histogram._name
    output.append(_header(name, histogram._documentation, "histogram"))
    names = histogram._labelnames
    bucket, count, total = name + "_bucket", name + "_count", name + "_sum"
    children = _children(histogram)
    for labels, child in children:
        accumulated = 0.0
        for le, value in zip(_bounds(tuple(child._upper_bounds)), child._buckets, strict=True):
            accumulated += value.get()
            output.append(f"{_series(bucket, names, labels, le)}{_number(accumulated)}\n")
        output.append(f"{_series(count, names, labels, None)}{_number(accumulated)}\n")
        if child._upper_bounds[0] >= 0:
            output.append(f"{_series(total, names, labels, None)}{_number(child._sum.get())}\n")
    _created_family(histogram, children, output)


# prometheus_client's metrics read directly (exactly these classes: a subclass may sample its own way).
_DIRECT: dict[type, Callable[[Any, list[str]], None]] = {
    Counter: _write_counter,
    Gauge: _write_gauge,
    Histogram: _write_histogram,
}
