"""A real Prometheus scrapes a private stack through a real failover, and every query of the Grafana
dashboard has data.

The stack runs everything ``drctl up`` does (prober, node agents, alert receiver) and its own
Prometheus (``LocalStack(with_prometheus=True)``, as ``drctl up --with-prometheus``): the generated
config scrapes this stack's ports every second and loads ``deploy/prometheus/rules``.
``llama-2-7b``'s serving instance is ``kill -9``ed and a failover started; Prometheus's HTTP API must
then show the run counted, its RTO observed, and the model back at its policy's counts.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from drctl.payloads import FailoverOutcome, FailoverRequest, FailoverResult, Role, Trigger
from drctl.policies.loader import load_policy_file
from drctl.settings import new_token
from drctl.temporal.runbooks import start_failover
from drctl.workers.binaries import MissingBinaryError
from drctl.workers.stack import LocalStack, free_ports, isolated_settings, prometheus_binary
from tests.integration.conftest import EXAMPLE_POLICY

pytestmark = pytest.mark.integration
MODEL = "llama-2-7b"
ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules" / "drctl.rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "drctl.json"
DASHBOARD_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "15m", "$model": ".*"}
"""What Grafana would put in the panels' queries (``$model``: its "All")."""
CLUSTER_ONLY = {
    "GPU memory used",
    "GPU temperature and utilisation",
    "Uncorrected ECC errors and Xid events",
}
"""Panels that can have data only with NVML (on a GPU node); the dashboard says so in their description."""


def _require_prometheus() -> None:
    try:
        prometheus_binary()
    except MissingBinaryError as exc:
        if os.geteuid() == 0:
            pytest.fail(f"{exc} (scripts/install-system-deps.sh installs it)")
        pytest.skip(f"{exc}; we are not root")


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    _require_prometheus()
    settings = isolated_settings(tmp_path_factory.mktemp("prometheus-stack"), EXAMPLE_POLICY)
    [receiver_port] = free_ports(1)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DRCTL_ALERT_TOKENS", json.dumps({"default": new_token()}))
        env.setenv("DRCTL_ALERT_RECEIVER_PORT", str(receiver_port))
        stack = LocalStack(
            settings,
            load_policy_file(EXAMPLE_POLICY),
            say=lambda _: None,
            with_prober=True,
            with_alert_receiver=True,
            with_node_agents=True,
            with_prometheus=True,
            prometheus_scrape_s=1.0,
        )
        try:
            await stack.start()
            yield stack
        finally:
            await stack.stop()


@dataclass
class Prometheus:
    url: str

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """The result of an instant query; an error (a bad expression) fails the test with its message."""
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.get(f"{self.url}/api/v1/query", params={"query": expr})
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def value(self, expr: str) -> float:
        """The value of a query that returns one series, 0 when it returns none."""
        result = await self.query(expr)
        assert len(result) <= 1, f"{expr}: {result}"
        return float(result[0]["value"][1]) if result else 0.0

    async def api(self, path: str) -> Any:
        async with httpx.AsyncClient(timeout=10) as http:
            body = (await http.get(f"{self.url}/api/v1/{path}")).json()
        assert body["status"] == "success", body
        return body["data"]

    async def until(self, what: str, check: Callable[[], Awaitable[object]], timeout_s: float = 60.0) -> None:
        """Until ``await check()`` returns True; anything else is what is still wrong, shown when it
        times out. Scrapes are every 1 s; the worker reads visibility every 5 s and the fleet every 10 s."""
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            last = await check()
            if last is True:
                return
            await asyncio.sleep(0.5)
        pytest.fail(f"Prometheus: {what} not seen within {timeout_s:.0f}s (last: {last})")


@dataclass
class Failover:
    prometheus: Prometheus
    result: FailoverResult
    recovered_before: float
    rto_count_before: float


RECOVERED_SERIES = f'drctl_runbooks_total{{type="FailoverWorkflow", outcome="recovered", model="{MODEL}"}}'
RECOVERED = f"sum({RECOVERED_SERIES})"
RTO_COUNT = f'sum(drctl_failover_rto_seconds_count{{model="{MODEL}"}})'


@pytest.fixture(scope="module")
async def failover(stack: LocalStack) -> Failover:
    """Once every target is up: note the figures, ``kill -9`` the serving instance, fail it over."""
    prometheus = Prometheus(stack.prometheus_url)
    expected = {job for job, targets in stack.prometheus_targets().items() for _ in targets}

    async def all_up() -> object:
        targets = (await prometheus.api("targets"))["activeTargets"]
        down = [(t["labels"]["job"], t["scrapeUrl"], t["lastError"]) for t in targets if t["health"] != "up"]
        return (not down and {t["labels"]["job"] for t in targets} == expected) or down

    await prometheus.until("every scrape target up", all_up)

    async def fleet_read() -> object:  # the worker reads the fleet at its start, then every 10 s
        return bool(await prometheus.query("drctl_instances_wanted"))

    await prometheus.until("the worker's fleet figures", fleet_read)
    recovered_before = await prometheus.value(RECOVERED)
    rto_count_before = await prometheus.value(RTO_COUNT)

    assert stack.client is not None
    [victim] = [i for i in stack.platform.registry.of_model(MODEL) if i.role == Role.SERVING]
    os.kill(victim.pid or 0, signal.SIGKILL)
    handle = await start_failover(
        stack.client,
        stack.settings,
        FailoverRequest(
            model=MODEL,
            instance=victim.id,
            reason="kill -9 in test",
            trigger=Trigger.DRILL,
            failed_at=datetime.now(UTC),
        ),
    )
    result: FailoverResult = await asyncio.wait_for(handle.result(), timeout=60)
    assert result.outcome == FailoverOutcome.RECOVERED, result
    return Failover(prometheus, result, recovered_before, rto_count_before)


async def test_prometheus_sees_the_failover(failover: Failover) -> None:
    prometheus = failover.prometheus

    async def counted() -> bool:
        return await prometheus.value(RECOVERED) >= failover.recovered_before + 1

    await prometheus.until("drctl_runbooks_total{outcome='recovered'} going up", counted)

    async def observed() -> bool:
        return await prometheus.value(RTO_COUNT) >= failover.rto_count_before + 1

    await prometheus.until("drctl_failover_rto_seconds_count moving", observed)
    rto_sum = await prometheus.value(f'sum(drctl_failover_rto_seconds_sum{{model="{MODEL}"}})')
    assert rto_sum > 0

    # The failed instance is counted, and the replenished fleet is back at the policy's counts.
    async def back_at_policy() -> object:
        wanted = await prometheus.query(f'drctl_instances_wanted{{model="{MODEL}"}}')
        have = {
            r["metric"]["role"]: float(r["value"][1])
            for r in await prometheus.query(f'drctl_instances{{model="{MODEL}"}}')
        }
        differ = {r["metric"]["role"]: (have.get(r["metric"]["role"]), r["value"][1]) for r in wanted}
        differ = {role: v for role, v in differ.items() if v[0] != float(v[1])}
        return (bool(wanted) and not differ and have.get("failed", 0) >= 1) or f"differ {differ}, failed {have}"

    await prometheus.until(f"{MODEL}'s drctl_instances back at its policy's", back_at_policy)


async def test_the_shipped_rules_are_loaded(failover: Failover) -> None:
    shipped = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    want = {group["name"]: {r["alert"] for r in group["rules"]} for group in shipped["groups"]}
    groups = (await failover.prometheus.api("rules"))["groups"]
    loaded = {group["name"]: {r["name"] for r in group["rules"]} for group in groups}
    assert loaded == want
    unhealthy = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r.get("health") == "err"]
    assert unhealthy == []


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every target of every panel, rows' panels included."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                queries.append((inner["title"], target["expr"]))
    return queries


def substitute(expr: str) -> str:
    for name, value in DASHBOARD_VARIABLES.items():
        expr = expr.replace(name, value)
    left = re.findall(r"\$\w+", expr)
    assert not left, f"variables the test does not substitute: {left}"
    return expr


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)
    # The exceptions the data test allows are exactly the panels the dashboard marks as cluster-only.
    marked = {p["title"] for p in panels if p["description"].startswith("Needs a cluster")}
    assert marked == CLUSTER_ONLY


async def test_every_dashboard_query_has_data(failover: Failover) -> None:
    prometheus = failover.prometheus

    # The failover has been counted and its histograms observed (as the test above waits for).
    # The failover's series have been scraped a few times (a rate needs two samples in its window).
    async def counted() -> object:
        return await prometheus.value(f"min(count_over_time({RECOVERED_SERIES}[1m]))") >= 3

    await prometheus.until("the failover counted", counted)
    empty, checked = [], 0
    for title, expr in dashboard_queries():
        result = await prometheus.query(substitute(expr))  # an error fails here, with its message
        checked += 1
        if not result and title not in CLUSTER_ONLY:
            empty.append(f"{title}: {expr}")
    assert checked >= 30
    assert empty == [], "dashboard queries with no series:\n" + "\n".join(empty)
