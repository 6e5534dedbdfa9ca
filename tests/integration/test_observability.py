"""Dashboards and alerts against the live Prometheus that scraped the live services.

The module drives its own traffic first — events (one rejected, one duplicate), model answers for both
variants, cold starts, a degraded stretch with Triton stopped, drifted histories — then checks that
every panel query and every alert's recorded series returns data, that every metric they name is
exported by a Vitrine service, Triton or redis_exporter, that promtool accepts the rules and the
rendered config, that drifted traffic raises the PSI, and that `vitrine report` renders a picture.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.invariants import eventually
from vitrine.contracts import topics
from vitrine.contracts.events import Event, EventType
from vitrine.export.data import synthetic
from vitrine.report import DASHBOARDS, expand, render
from vitrine.services.events.publisher import publish
from vitrine.services.features import metrics as feature_metrics
from vitrine.services.gateway import metrics as gateway_metrics
from vitrine.services.gateway.client import GatewayClient
from vitrine.services.stack import Stack
from vitrine.services.stack.components import ALERT_RULES
from vitrine.v1 import recommender_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "max", "min", "or", "vector", "le", "on", "without", "and",
                "label_values", "bool", "avg", "count", "offset", "ignoring", "group_left", "group_right", "abs"}
INTENTIONALLY_EMPTY: dict[str, str] = {}
"""Panel title → why its query may return nothing. Empty: every panel must show data."""


def _panels() -> list[tuple[str, dict]]:
    return [(f.name, p) for f in sorted(DASHBOARDS.glob("*.json")) for p in json.loads(f.read_text())["panels"]]


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERT_RULES.read_text())["groups"] for rule in group["rules"]]


async def _query(stack: Stack, expr: str) -> list[dict]:
    async with httpx.AsyncClient(timeout=10) as client:
        body = (await client.get(f"{stack.settings.prometheus.url}/api/v1/query", params={"query": expr})).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


@pytest.fixture(scope="module")
async def traffic(stack: Stack) -> AsyncIterator[dict[str, float]]:
    """Drive every kind of traffic the dashboards show; returns the drift PSI seen before the drifted part."""
    bootstrap = stack.settings.kafka.bootstrap_servers
    table = synthetic.generate(synthetic.preset("default"))
    normal = [e for e in table.events()][:3000]
    tag = uuid.uuid4().hex[:6]
    normal = [e.model_copy(update={"user_id": f"{tag}-{e.user_id}", "event_id": f"{tag}-{e.event_id}", "ts_ms": int(time.time() * 1000)})
              for e in normal]
    await publish(normal + normal[:5], bootstrap, topics.EVENTS, retime=False)  # five duplicates
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    await producer.send_and_wait(topics.EVENTS, b"{not json")
    await producer.stop()
    users = sorted({e.user_id for e in normal})[:300]
    # Pin the shipped versions (trained on this storefront): a reused stack may serve newer exports trained on other data.
    async with GatewayClient(stack.settings.gateway.address, "vitrine-demo-experimenter") as admin:
        previous = await admin.get_experiment()
        await admin.set_experiment(pb.Experiment(name="default", salt="vitrine", variants=[
            pb.Variant(name="control", model_name="gru4rec", model_version="1", weight=50),
            pb.Variant(name="treatment", model_name="sasrec", model_version="1", weight=50)]))
    try:
        async with GatewayClient(stack.settings.gateway.address, "vitrine-demo-storefront") as client:
            async def warmed() -> bool | None:
                return True if (await client.recommend(users[-1])).model_name in ("gru4rec", "sasrec") else None

            await eventually(warmed, 20, "features of the traffic users")
            for user in users:
                await client.recommend(user, k=10, page="home")
            for n in range(50):
                await client.recommend(f"{tag}-cold-{n}", k=5)
            await asyncio.to_thread(stack.supervisor.rpc_stop, "triton")
            try:
                for user in users[:20]:
                    assert (await client.recommend(user, k=5)).degraded
            finally:
                await stack.up(report=lambda line: None)
            # The baseline must exist: the gauge appears once the monitor has computed over this traffic
            # (every drift_interval_s); a missing gauge is a failure, not a PSI of 0.
            async def baseline() -> dict[str, float] | None:
                now = await _gateway_psi(stack)
                return now if "unknown_item_rate" in now else None

            psi_before = await eventually(baseline, 3 * stack.settings.gateway.drift_interval_s + 10, "the baseline PSI gauge")
            # Drift: shoppers who only look at a new item line the models have never seen.
            new_line = [f"i{n}" for n in range(5000, 5100)]
            drifted = [Event(event_id=f"{tag}-d{u}-{s}", user_id=f"{tag}-drift-{u}", item_id=new_line[(u + s) % 100], type=EventType.VIEW,
                             ts_ms=int(time.time() * 1000) + s) for u in range(200) for s in range(6)]
            await publish(drifted, bootstrap, topics.EVENTS, retime=False)

            async def drift_ready() -> bool | None:
                return True if (await client.recommend(f"{tag}-drift-199")).model_name in ("gru4rec", "sasrec") else None

            await eventually(drift_ready, 20, "features of the drifted users")
            for _ in range(3):
                for u in range(200):
                    await client.recommend(f"{tag}-drift-{u}", k=10)
        yield psi_before
    finally:  # the split found, back
        async with GatewayClient(stack.settings.gateway.address, "vitrine-demo-experimenter") as admin:
            await admin.set_experiment(pb.Experiment(name=previous.name, salt=previous.salt, variants=previous.variants))


async def _gateway_psi(stack: Stack) -> dict[str, float]:
    url = f"http://{stack.settings.gateway.metrics_host}:{stack.settings.gateway.metrics_port}/metrics"
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(url)).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(gateway_metrics.DRIFT_PSI + "{"):
            feature = re.search(r'feature="([^"]+)"', line).group(1)
            values[feature] = max(values.get(feature, 0.0), float(line.rsplit(" ", 1)[1]))
    return values


async def _until_all_have_data(stack: Stack, queries: dict, what: str) -> None:
    """Every query (key → PromQL) returns data within 90 s; otherwise fail naming the keys still empty."""
    pending = dict(queries)

    async def all_have_data() -> bool | None:
        for key in sorted(pending):
            if await _query(stack, pending[key]):
                del pending[key]
        return True if not pending else None

    try:
        await eventually(all_have_data, 90, f"data for every one of the {what}", interval_s=2)
    except AssertionError:
        pytest.fail(f"{what} without data: {sorted(pending)}")


async def test_drifted_traffic_raises_the_population_stability_index(stack: Stack, traffic: dict[str, float]) -> None:
    async def risen() -> dict[str, float] | None:
        now = await _gateway_psi(stack)
        return now if now.get("unknown_item_rate", 0) > 0.25 else None

    assert "unknown_item_rate" in traffic, f"no baseline PSI gauge for unknown_item_rate (have {sorted(traffic)})"
    after = await eventually(risen, 30, "the unknown-item PSI to pass 0.25", interval_s=1)
    assert traffic["unknown_item_rate"] < 0.1  # normal traffic: items the models know
    assert after["unknown_item_rate"] > traffic["unknown_item_rate"] + 0.2


async def test_every_panel_query_returns_data(stack: Stack, traffic: dict[str, float]) -> None:
    queries = {(name, p["title"], t["expr"]): expand(t["expr"])
               for name, p in _panels() for t in p.get("targets", []) if p["title"] not in INTENTIONALLY_EMPTY}
    assert len(queries) > 25
    await _until_all_have_data(stack, queries, "panels")


async def test_every_alert_watches_a_series_that_has_data(stack: Stack, traffic: dict[str, float]) -> None:
    records = [r["record"] for r in _rules() if "record" in r]
    alerts = [r for r in _rules() if "alert" in r]
    assert len(alerts) >= 7
    for alert in alerts:
        watched = re.match(r"^\s*([a-zA-Z_:][\w:]*)", alert["expr"]).group(1)
        assert watched in records or watched == "up", alert["alert"]
    await _until_all_have_data(stack, {name: name for name in {*records, "up"}}, "recorded series")


async def test_every_metric_name_used_is_exported(stack: Stack, traffic: dict[str, float]) -> None:
    exported = {"up"} | {r["record"] for r in _rules() if "record" in r}
    for module in (gateway_metrics, feature_metrics):
        for name in (v for k, v in vars(module).items() if k.isupper() and isinstance(v, str) and v.startswith("vitrine_")):
            exported |= {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    async with httpx.AsyncClient(timeout=5) as client:
        for url in (f"http://{stack.settings.triton.host}:{stack.settings.triton.metrics_port}/metrics",
                    f"http://{stack.settings.redis_exporter.host}:{stack.settings.redis_exporter.port}/metrics"):
            exported |= {line.split("{")[0].split(" ")[0] for line in (await client.get(url)).text.splitlines() if line and not line.startswith("#")}
    expressions = [t["expr"] for _, p in _panels() for t in p.get("targets", [])] + [r["expr"] for r in _rules()]
    used = set()
    for expr in expressions:
        cleaned = re.sub(r'"[^"]*"', '""', re.sub(r"\{[^}]*\}", "", re.sub(r"\[[^\]]*\]", "", expr)))
        cleaned = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", cleaned)  # label lists
        used |= {w for w in re.findall(r"[a-zA-Z_:][\w:]*", cleaned) if w not in PROMQL_WORDS and not w.startswith("$")}
    assert used - exported == set()


def test_promtool_accepts_the_rules_and_the_rendered_config(stack: Stack) -> None:
    rules = subprocess.run(["promtool", "check", "rules", str(ALERT_RULES)], capture_output=True, text=True)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = stack.settings.stack.home / "prometheus" / "prometheus.yml"
    checked = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_prometheus_scrapes_every_target(stack: Stack, traffic: dict[str, float]) -> None:
    jobs = {r["metric"]["job"]: r["value"][1] for r in await _query(stack, "up")}
    assert jobs == {job: "1" for job in ("prometheus", "redis", "triton", "features", "gateway")}


async def test_report_renders_the_key_panels(stack: Stack, traffic: dict[str, float], tmp_path: Path) -> None:
    out = await asyncio.to_thread(render, stack.settings.prometheus.url, tmp_path / "report.png", 10)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
