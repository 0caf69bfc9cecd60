"""The real Prometheus scrapes a node with deploy/'s config and rules; the Grafana dashboards ask only for metrics
that exist, and Prometheus runs every one of their queries."""

from __future__ import annotations

import asyncio
import importlib
import json
import pkgutil
import re
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from prometheus_client import REGISTRY, Metric
from prometheus_client.parser import text_string_to_metric_families

from edgevm.cli.natsserver import free_port
from edgevm.shared.client import Client
from edgevm.shared.config import DEFAULT_METRICS_BASE, SERVICES
from edgevm.shared.errors import RemoteError
from tests.e2e.conftest import World, start_node_up
from tests.helpers import eventually

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
PROMETHEUS_RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARDS = sorted((DEPLOY / "grafana").glob("*.json"))
NODE_LABEL = "e2e-prom"
# Made by Prometheus for every target it scrapes, not exported by a service.
PROMETHEUS_OWN = {"up"}
# The values Grafana would put in for the dashboard's variables, to run its queries against Prometheus.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m", "node": ".*", "service": ".*",
                     "vm": ".*", "gateway": ".*"}

# --- the metric names a PromQL expression uses -------------------------------------------------------------

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_NUMBER = re.compile(r"(?<![\w:])(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?(?:ms|[smhdwy])?", re.IGNORECASE)
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.*),)?\s*\w+\s*\)\s*$", re.DOTALL)


def metric_names(expr: str) -> set[str]:
    """Return the metric names `expr` selects: identifiers that are not functions, keywords or labels."""
    text = _VARIABLE.sub(" ", _STRING.sub('""', expr))
    text = _RANGE.sub(" ", _MATCHERS.sub(" ", text))
    text = _NUMBER.sub(" ", _LABEL_LIST.sub(" ", text))
    names = set()
    for match in _IDENTIFIER.finditer(text):
        is_call = text[match.end():].lstrip().startswith("(")
        if not is_call and match.group().lower() not in _KEYWORDS:
            names.add(match.group())
    return names


def dashboard_queries(dashboard: Path) -> list[tuple[str, str]]:
    """Return (where, PromQL) for every panel target and every query variable of the dashboard."""
    board = json.loads(dashboard.read_text())
    found = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((f"{dashboard.name}: panel {panel['title']!r} target {target['refId']}", target["expr"]))
            walk(panel.get("panels", []))

    walk(board["panels"])
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            inner = _LABEL_VALUES.match(query)
            found.append((f"{dashboard.name}: variable ${variable['name']}", (inner.group(1) or "") if inner else query))
    return [(where, expr) for where, expr in found if expr]


def every_dashboard_query() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard in deploy/grafana."""
    return [query for dashboard in DASHBOARDS for query in dashboard_queries(dashboard)]


def grafana_expanded(expr: str, **values: str) -> str:
    """Return `expr` with Grafana's variables replaced the way Grafana would, for Prometheus to run."""
    known = {**GRAFANA_VARIABLES, **values}
    return _VARIABLE.sub(lambda m: known[m.group(1)], expr)


def exposed_names(family: Metric) -> set[str]:
    """Return the series names a metric family shows Prometheus (a histogram X is X_bucket, X_sum, ...)."""
    name = family.name
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "summary": ["", "_sum", "_count", "_created"],
        "info": ["_info"],
    }.get(family.type, [""])
    return {name + suffix for suffix in suffixes} | {sample.name for sample in family.samples}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (service, code) (rate(edgevm_commands_total{code!="200", node=~"$node"}[$__rate_interval]))',
         {"edgevm_commands_total"}),
        ("histogram_quantile(0.95, sum by (le) (rate(a_bucket[5m]))) / on (job) group_left (x) b", {"a_bucket", "b"}),
        ("(count(max by (node) (c) == 1) or vector(0)) > bool 1e-9 unless d offset 1h", {"c", "d"}),
        ('up{job=~"edgevm-.*"} and rate(process_cpu_seconds_total[${__range}])', {"up", "process_cpu_seconds_total"}),
    ],
)
def test_metric_names_of_an_expression(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_every_dashboard_is_importable_as_it_is() -> None:
    assert {d.name for d in DASHBOARDS} == {"edgevm-dashboard.json", "edgevm-vms.json", "edgevm-fleet.json"}
    uids = set()
    for dashboard in DASHBOARDS:
        board = json.loads(dashboard.read_text())
        assert board["id"] is None and board["uid"] not in uids, f"{dashboard.name}: an import makes a new dashboard"
        uids.add(board["uid"])
        [datasource] = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
        sources = {json.dumps(p["datasource"]) for p in _panels(board["panels"]) if p["type"] != "row"}
        sources |= {json.dumps(v["datasource"]) for v in board["templating"]["list"] if v["type"] == "query"}
        assert sources == {json.dumps({"type": "prometheus", "uid": f"${{{datasource['name']}}}"})}, (
            f"{dashboard.name}: every panel and variable takes the data source variable")
        ids = [p["id"] for p in _panels(board["panels"])]
        assert len(ids) == len(set(ids)), f"{dashboard.name}: panel ids are unique"


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


async def test_the_dashboards_use_only_metrics_the_services_register() -> None:
    # Every module of every service, so that each metric created at import is in REGISTRY...
    for package in ["edgevm.shared", *(f"edgevm.{s}" for s in SERVICES)]:
        root = importlib.import_module(package)
        for module in pkgutil.walk_packages(root.__path__, f"{package}."):
            if not module.name.endswith("__main__"):
                importlib.import_module(module.name)
    # ...and the collectors a service registers only when it starts, which compute their gauges at scrape time.
    from edgevm.flowwatch.collector import ActiveFlowsCollector
    from edgevm.gateway.metrics import FleetCollector
    from edgevm.gateway.model import FleetModel
    from edgevm.lifecycle.vmmetrics import VmMetrics
    from edgevm.snapshotter.metrics import SnapshotCollector

    loop = asyncio.get_running_loop()
    collectors = [REGISTRY, FleetCollector(FleetModel(), loop), ActiveFlowsCollector(dict, loop),
                  SnapshotCollector(dict, "n")]
    # Collected on a thread of their own, as the scrape thread does: scrape-time reads wait for the loop.
    registered = await asyncio.to_thread(
        lambda: {name for collector in collectors for family in collector.collect() for name in exposed_names(family)}
    )
    # ...and the text sources served after the registry (see edgevm.shared.metrics.Exposition).
    text = VmMetrics(list, "n", 1, 1).exposition()
    registered |= {name for family in text_string_to_metric_families(text) for name in exposed_names(family)}
    queries = every_dashboard_query()
    assert len(queries) > 60, "the dashboards' queries were not found"
    unknown = {where: sorted(metric_names(expr) - registered - PROMETHEUS_OWN) for where, expr in queries}
    assert not {where: names for where, names in unknown.items() if names}, "metrics no service registers"


def test_promtool_accepts_the_scrape_config() -> None:
    checked = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- a node scraped by the real Prometheus -----------------------------------------------------------------


def http_json(url: str) -> Any:
    """GET `url` and decode its JSON body (Prometheus answers errors with JSON too)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        return json.load(exc)


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def scrape_config_for(node_metrics_base: int) -> dict[str, Any]:
    """deploy/'s config with the test node's metrics ports, its node label, deploy/'s rules by their absolute
    path and a 1 s scrape interval."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    assert config["rule_files"] == [PROMETHEUS_RULES.name], "deploy's config loads deploy's rules"
    config["rule_files"] = [str(PROMETHEUS_RULES)]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {f"edgevm-{s}" for s in SERVICES}, "deploy's config has a job per service"
    for name, job in jobs.items():
        [group] = job["static_configs"]
        [target] = group["targets"]
        host, port = target.rsplit(":", 1)
        service_index = SERVICES.index(name.removeprefix("edgevm-"))
        assert int(port) == DEFAULT_METRICS_BASE + service_index, f"{name} scrapes {target}: the wrong port"
        group["targets"] = [f"{host}:{node_metrics_base + service_index}"]
        group["labels"]["edgevm_node"] = NODE_LABEL
    return config


class Prometheus:
    """The Debian `prometheus` binary run on a free port with its own storage."""

    def __init__(self, config: dict[str, Any], directory: Path) -> None:
        directory.mkdir()
        self.config_path = directory / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = directory / "prometheus.log"
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={self.config_path}", f"--storage.tsdb.path={directory / 'tsdb'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT,
        )

    def api(self, path: str, **params: str) -> Any:
        """Call Prometheus' HTTP API (blocking)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return http_json(f"{self.url}/api/v1/{path}{query}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Run an instant query; return its result vector (raise with Prometheus' error when it fails)."""
        answer = self.api("query", query=expr)
        if answer.get("status") != "success":
            raise AssertionError(f"{expr!r}: {answer.get('errorType')}: {answer.get('error')}")
        return list(answer["data"]["result"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def scraped_node(tmp_path: Path, node_world: World) -> Iterator[tuple[str, int, Path]]:
    """`edgevm node up` on libvirt's test driver: (NATS URL, metrics base port, log)."""
    node = start_node_up(tmp_path / "state", tmp_path / "node.log", node_world)
    try:
        yield node.url, node.metrics_base, node.log
    finally:
        node.stop()


@pytest.mark.root
async def test_prometheus_scrapes_every_service_of_a_node(scraped_node: tuple[str, int, Path], tmp_path: Path) -> None:
    url, metrics_base, node_log = scraped_node
    nc = await nats.connect(url)
    try:
        client = Client(nc, "e2e", timeout=5)
        await eventually(lambda: client.call("vm.list"), timeout=20, what="lifecycle answers vm.list")
        await eventually(lambda: client.gateway("vm.list"), timeout=20, what="the gateway answers gw.vm.list")
        with pytest.raises(RemoteError) as missing:
            await client.call("vm.get", {"name": "no-such-vm"})
        assert missing.value.code == "404"
    finally:
        await nc.close()

    prometheus = Prometheus(scrape_config_for(metrics_base), tmp_path / "prometheus")
    try:
        targets = await eventually(lambda: asyncio.to_thread(_all_up, prometheus), timeout=20,
                                   what="Prometheus scrapes all five services")
        assert sorted(t["labels"]["job"] for t in targets) == sorted(f"edgevm-{s}" for s in SERVICES)

        # The 404 the node answered, as Prometheus stored it (labels as the endpoint adapter sets them).
        not_found = ('edgevm_commands_total{job="edgevm-lifecycle", service="edgevm-lifecycle", '
                     f'endpoint="vm.get", code="404", edgevm_node="{NODE_LABEL}"}}')
        [series] = await eventually(lambda: asyncio.to_thread(prometheus.query, not_found), timeout=10,
                                    what=f"Prometheus has {not_found}")
        assert float(series["value"][1]) >= 1
        assert await asyncio.to_thread(
            prometheus.query, 'edgevm_commands_total{service="edgevm-gateway", endpoint="gw.vm.list", code="200"} >= 1')

        # The dashboard: the metrics it asks for are all served by the node, its queries all run, and its
        # panels show the node's services and the 404 above.
        served = set(PROMETHEUS_OWN)
        for index in range(len(SERVICES)):
            text = await asyncio.to_thread(http_text, f"http://127.0.0.1:{metrics_base + index}/metrics")
            served |= {name for family in text_string_to_metric_families(text) for name in exposed_names(family)}
        queries = every_dashboard_query()
        unserved = {where: sorted(metric_names(expr) - served) for where, expr in queries}
        assert not {where: names for where, names in unserved.items() if names}, "metrics the node does not serve"
        for where, expr in queries:
            try:
                await asyncio.to_thread(prometheus.query, grafana_expanded(expr, node=NODE_LABEL))
            except AssertionError as exc:
                raise AssertionError(f"{where}: Prometheus refuses the query: {exc}") from None
        await eventually(lambda: asyncio.to_thread(_rules_evaluated, prometheus), timeout=10,
                         what="Prometheus evaluates every rule of deploy's rules.yml")
        [services_up] = [expr for where, expr in queries if where.startswith("edgevm-dashboard.json: panel 'Services up'")]
        up = await asyncio.to_thread(prometheus.query, grafana_expanded(services_up, node=NODE_LABEL))
        assert sorted((s["metric"]["job"], s["value"][1]) for s in up) == sorted((f"edgevm-{s}", "1") for s in SERVICES)
        [command_rate] = [expr for where, expr in queries if where.startswith("edgevm-dashboard.json: panel 'Command rate by")]
        shown_404 = {"service": "edgevm-lifecycle", "endpoint": "vm.get", "code": "404"}
        await eventually(lambda: _shows(prometheus, grafana_expanded(command_rate, node=NODE_LABEL), shown_404),
                         timeout=10, what=f"the command rate panel shows {shown_404} (two scrapes of lifecycle)")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- prometheus log:\n{tail(prometheus.log_path)}\n"
                             f"--- node log:\n{tail(node_log)}") from exc
    finally:
        await asyncio.to_thread(prometheus.stop)
    assert prometheus.process.returncode == 0, tail(prometheus.log_path)


def _all_up(prometheus: Prometheus) -> list[dict[str, Any]]:
    """Return the active targets when there are five and all are up; raise with their errors otherwise."""
    if prometheus.process.poll() is not None:
        raise RuntimeError(f"prometheus exited with code {prometheus.process.returncode}")
    answer = prometheus.api("targets", state="active")
    targets = list(answer["data"]["activeTargets"])
    states = [(t["labels"]["job"], t["health"], t["lastError"]) for t in targets]
    if len(targets) != len(SERVICES) or any(t["health"] != "up" for t in targets):
        raise AssertionError(f"targets (job, health, last error): {states}")
    return targets


def _rules_evaluated(prometheus: Prometheus) -> bool:
    """Whether every rule of rules.yml is loaded and was evaluated without error; raise naming those that were not."""
    groups = prometheus.api("rules")["data"]["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    expected = {rule["alert"] for group in yaml.safe_load(PROMETHEUS_RULES.read_text())["groups"]
                for rule in group["rules"]}
    assert set(rules) == expected, f"loaded rules: {sorted(rules)}"
    unhealthy = {name: (rule["health"], rule.get("lastError")) for name, rule in rules.items() if rule["health"] != "ok"}
    assert not unhealthy, f"rules not evaluated: {unhealthy}"
    return True


async def _shows(prometheus: Prometheus, expr: str, labels: dict[str, str]) -> bool:
    """Whether `expr` has a series with exactly `labels` now."""
    result = await asyncio.to_thread(prometheus.query, expr)
    return labels in [series["metric"] for series in result]
