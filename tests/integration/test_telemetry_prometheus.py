"""A real Prometheus scrapes telemetry and evaluates every query of the Grafana dashboard without error; behind a
running network's traffic, telemetry's /metrics passes ``promtool check metrics`` and Prometheus evaluates every
shipped rule (ops/prometheus/rules) against it without error.

Needs the ``prometheus`` and ``promtool`` binaries (``apt-get install prometheus``, done by ``ops/setup.sh`` where
it can); skipped without them.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from din.client import DinRequestError
from din.services.telemetry.main import create_runtime
from din.services.telemetry.settings import TelemetrySettings
from din.shared.contracts.events import CompletionV1
from din.shared.contracts.federation import ModelSummaryV1, SiteSummaryV1
from din.shared.errors import ErrorCode
from din.shared.naming import Subjects
from tests.integration.network import running_network
from tests.integration.test_telemetry_service import http_get, samples, total
from tests.support import free_port, make_heartbeat, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "din.json"
PROMETHEUS_CONFIG = ROOT / "ops" / "prometheus" / "prometheus.yml"
RULE_FILES = sorted((ROOT / "ops" / "prometheus" / "rules").glob("*.yml"))
ONE_SITE = {
    "name": "telemetry-prometheus",
    "sites": [{"name": "cloud", "role": "hub", "executors": [{"id": "cloud-1", "models": ["digits-small"]}]}],
    "links": [],
    "tenants": [{"name": "acme", "rate_per_s": 5000, "burst": 5000}, {"name": "tiny", "rate_per_s": 1, "burst": 1}],
}
"""The smallest network with traffic of every kind: one site, one executor, and a tenant that is soon rate
limited."""


def query(port: int, expr: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var in ("$tenant", "$model", "$site", "$sla_class"):
                expr = expr.replace(var, ".*")
            out.append((panel["title"], expr))
    return out


@pytest.fixture(scope="module")
def prometheus_bin():
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        pytest.skip("prometheus and promtool are not installed (apt-get install prometheus)")
    return shutil.which("prometheus")


@pytest.fixture(scope="module")
def one_site_network(prometheus_bin, kafka_access, zoo_dir, tmp_path_factory):
    """A running one-site network, started only once Prometheus is known to be installed."""
    with running_network(kafka_access, zoo_dir, tmp_path_factory.mktemp("din"), "centralized",
                         topology_spec=ONE_SITE) as net:
        yield net


def start_prometheus(prometheus_bin: str, metrics_port: int, tmp_path: Path, rule_files: list[Path] = ()):
    """A Prometheus scraping telemetry every second as job ``din-telemetry`` (evaluating ``rule_files`` every
    second); returns the process and its API port."""
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: {json.dumps([str(p) for p in rule_files])}\n"
        "scrape_configs:\n"
        f"  - job_name: din-telemetry\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    process = subprocess.Popen(
        [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return process, port


def api(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/{path}", timeout=5) as response:
        return json.loads(response.read())


def test_shipped_prometheus_config_is_valid(prometheus_bin):
    result = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_every_dashboard_query_evaluates_against_scraped_telemetry(
    prometheus_bin, nats_network, kafka_access, recorded_topics, unique, tmp_path
):
    metrics_port = free_port()
    await recorded_topics(unique)
    runtime = create_runtime(TelemetrySettings(
        nats_url=nats_network.hub_url, site="cloud", topic_scope=unique,
        # the session Kafka has its own CA (bus_ca_file); the session NATS takes plain client connections
        **(nats_network.service_login("telemetry", "cloud") | kafka_access.settings("telemetry")),
        metrics_port=metrics_port, alert_interval_s=0.5))
    await runtime.app.start()
    prometheus, prom_port = start_prometheus(prometheus_bin, metrics_port, tmp_path)
    nc = await nats_network.connect()
    try:
        heartbeat = make_heartbeat("cloud-1", "cloud", ["digits-small"], compute_ms_per_item=0.3, capacity=8,
                                   queue_depth={"batch": 1}, inflight=1, recent_latency_ms=2.0, interval_s=60.0,
                                   sent_ms=time.time() * 1000)
        summary = SiteSummaryV1(site="factory", instance="factory", sent_ms=time.time() * 1000, interval_s=60.0,
                                models=[ModelSummaryV1(model="digits-small", versions=["1"], executors=1,
                                                       free_slots={"batch": 4}, queue_depth=1,
                                                       compute_ms_per_item=0.3, best_ms={"batch": 1.0},
                                                       cost_per_1k=0.1)])

        async def request_rate_scraped() -> bool:
            """Send one more heartbeat, site summary and round of completions, then ask Prometheus for the request
            rate."""
            await nc.publish(Subjects.heartbeat("cloud", "cloud-1"), heartbeat.model_dump_json().encode())
            await nc.publish(Subjects.summary("factory"), summary.model_dump_json().encode())
            for i in range(20):
                event = CompletionV1(
                    request_id=f"r{i}", tenant="acme", site="cloud", executor="cloud-1", model="digits-small",
                    model_version="1", sla_class="interactive", ok=True, batch_size=4, degraded=i % 5 == 0,
                    timings_ms={"admission": 0.1, "classify": 0.1, "schedule": 0.2, "queue": 1.0, "compute": 0.5,
                                "total": 3.0 + i, "ttft": 1.0, "tpot": 0.2}, at_ms=time.time() * 1000)
                await nc.publish(Subjects.completed("cloud"), event.model_dump_json().encode())
            result = await asyncio.to_thread(query, prom_port, "sum(rate(din_requests_total[1m]))")
            rates = result["data"]["result"] if result.get("status") == "success" else []
            return bool(rates) and float(rates[0]["value"][1]) > 0

        await wait_for(request_rate_scraped, 40, "Prometheus scraping a request rate from telemetry", interval=1.0,
                       retry_on=(OSError,))

        empty = []
        for title, expr in dashboard_queries():
            result = await asyncio.to_thread(query, prom_port, expr)
            assert result.get("status") == "success", f"{title}: {expr}: {result.get('error')}"
            if not result["data"]["result"]:
                empty.append(title)
        # rejects, admission, scheduling, multi-stage hand-offs and the autoscaler's decisions need events this
        # test does not send; everything else has data
        assert set(empty) <= {"Rejects by stage and reason", "Admission decisions", "Scheduling decisions",
                              "Requests over their SLA target", "Invalid events (dead-lettered or skipped)",
                              "Multi-stage hand-offs (per s) and bytes handed on (per s)",
                              "Autoscaler: desired executors per pool, cost per hour, cold start p90 (s), changes "
                              "per min"}, empty
    finally:
        prometheus.terminate()
        prometheus.wait(10)
        await nc.close()
        await runtime.app.stop()


async def test_metrics_behind_real_traffic_pass_promtool_and_every_rule_evaluates(
    prometheus_bin, one_site_network, digits, tmp_path
):
    network = one_site_network
    metrics_port = network.stack.ports.telemetry_metrics
    prometheus, prom_port = start_prometheus(prometheus_bin, metrics_port, tmp_path, RULE_FILES)
    x, _ = digits
    page: list[bytes] = []
    try:
        async with network.client("acme") as acme, network.client("tiny") as tiny:
            async def traffic_counted() -> bool:
                """Send one more round (answered, refused as unknown, rate limited), then read telemetry's page:
                admission's decisions reach telemetry through Kafka, after its consumer joined."""
                for i in range(5):
                    await acme.infer("digits-small", {"input": x[i : i + 1]}, sla="realtime")
                refused = []
                for client, model in ((acme, "no-such-model"), (tiny, "digits-small"), (tiny, "digits-small")):
                    try:
                        await client.infer(model, {"input": x[:1]})
                    except DinRequestError as error:
                        refused.append(error.error.code)
                assert ErrorCode.UNKNOWN_MODEL in refused
                _, body = await http_get(metrics_port, "/metrics")
                page[:] = [body]
                found = samples(body)
                return (total(found, "din_requests_total", tenant="acme", outcome="ok") > 0
                        and total(found, "din_rejects_total", stage="admission", reason="rate_limited") > 0
                        and total(found, "din_executor_up") > 0
                        and any(s.labels.get("quantile") for s in found.get("din_sla_latency_seconds", [])))

            await wait_for(traffic_counted, 60, "answers, refusals, heartbeats and latency quantiles on /metrics",
                           interval=0.5)
        result = subprocess.run(["promtool", "check", "metrics"], input=page[0], capture_output=True, timeout=30)
        assert result.returncode == 0, (result.stdout + result.stderr).decode()

        def rules_evaluated_over_traffic() -> list[dict] | None:
            """Every shipped rule, once each was evaluated after the request rate could be recorded."""
            evaluated = [r for g in api(prom_port, "rules")["data"]["groups"] for r in g["rules"]]
            recorded = api(prom_port, "query?" + urllib.parse.urlencode(
                {"query": "tenant_model_outcome:din_admission_requests:rate5m"}))["data"]["result"]
            return evaluated if recorded and all(r["health"] != "unknown" for r in evaluated) else None

        evaluated = await wait_for(lambda: asyncio.to_thread(rules_evaluated_over_traffic), 40,
                                   "Prometheus evaluating the shipped rules over a scraped request rate",
                                   interval=1.0, retry_on=(OSError,))
        assert len(evaluated) == sum(len(g["rules"]) for p in RULE_FILES for g in yaml.safe_load(p.read_text())
                                     ["groups"])
        failing = {r["name"]: r.get("lastError") for r in evaluated if r["health"] != "ok"}
        assert not failing, failing
        shed = api(prom_port, "query?" + urllib.parse.urlencode(
            {"query": "reason:din_admission_shed:ratio_rate5m"}))["data"]["result"]
        assert {s["metric"]["reason"] for s in shed} == {"rate_limited"}
    finally:
        prometheus.terminate()
        prometheus.wait(10)
