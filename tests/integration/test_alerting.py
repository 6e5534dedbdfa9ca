"""Prometheus → Alertmanager → the trigger service's webhook → a pipeline run, on the real stack.

A test-only rule file (in the stack's prometheus/rules.d/, loaded by a reload) makes two alerts fire at once:
one labelled `action: retrain`, one not. Alertmanager must hold both, route only the first to the pipeline
trigger, and POST it with the stack's bearer token to the stack's own trigger service, which must accept it
(an unauthenticated or unrouted post would be counted as rejected, or not at all) and start a drift-triggered
pipeline run. The test stack's pipeline settings keep that run small and private (tests/integration/conftest.py)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest

from tests.integration.invariants import eventually
from vitrine.services.stack import Stack
from vitrine.services.stack.components import EXTRA_RULES_DIR

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


FIRE_AFTER = "10s"
"""`for:` of the planted rules. Not 0: a reload makes Prometheus rediscover its Alertmanagers (a few seconds), and an
alert that fires before that is dropped and re-sent only after `--rules.alert.resend-delay` (1 min)."""


def _rules(retrain: str, other: str) -> str:
    return f"""groups:
  - name: vitrine-test-alert-path
    rules:
      - alert: {retrain}
        expr: vector(1)
        for: {FIRE_AFTER}
        labels: {{severity: ticket, action: retrain}}
        annotations: {{summary: "test-only: the retrain path"}}
      - alert: {other}
        expr: vector(1)
        for: {FIRE_AFTER}
        labels: {{severity: page}}
"""


async def _reload(stack: Stack) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        (await client.post(f"{stack.settings.prometheus.url}/-/reload")).raise_for_status()


async def test_prometheus_delivers_a_retrain_alert_to_the_pipeline_trigger(stack: Stack) -> None:
    suffix = uuid.uuid4().hex[:8]
    retrain, other = f"VitrineTestRetrain{suffix}", f"VitrineTestPage{suffix}"
    metrics_url = f"http://{stack.settings.triggers.host}:{stack.settings.triggers.port}/metrics"

    async def counters() -> dict[str, float]:
        async with httpx.AsyncClient(timeout=5) as client:
            text = (await client.get(metrics_url)).text
        wanted = {'vitrine_triggers_received_total{source="alertmanager"}': "received",
                  'vitrine_triggers_runs_started_total{trigger="drift"}': "started",
                  'vitrine_triggers_rejected_total{reason="unauthorized"}': "unauthorized",
                  'vitrine_triggers_rejected_total{reason="debounced"}': "debounced"}
        found = {name: 0.0 for name in wanted.values()}
        for line in text.splitlines():
            key, _, value = line.rpartition(" ")
            if key in wanted:
                found[wanted[key]] = float(value)
        return found

    before = await counters()
    rules = Path(stack.settings.stack.home) / "prometheus" / EXTRA_RULES_DIR / f"test-alert-path-{suffix}.yml"
    rules.write_text(_rules(retrain, other))
    try:
        await _reload(stack)

        async def in_alertmanager() -> dict[str, list[str]] | None:
            async with httpx.AsyncClient(timeout=5) as client:
                alerts = (await client.get(f"{stack.settings.alertmanager.url}/api/v2/alerts")).json()
            routed = {a["labels"]["alertname"]: [r["name"] for r in a["receivers"]] for a in alerts
                      if a["labels"]["alertname"] in (retrain, other)}
            return routed if len(routed) == 2 else None

        routed = await eventually(in_alertmanager, timeout_s=90, what="both test alerts in Alertmanager", interval_s=1)
        assert routed == {retrain: ["pipeline-trigger"], other: ["null"]}

        # The webhook: after group_wait, one accepted POST for the retrain group, which starts a drift run (or is
        # debounced, when an earlier run of this test on a reused stack started one within the debounce interval).
        async def accepted() -> dict[str, float] | None:
            now = await counters()
            return now if now["received"] > before["received"] else None

        after = await eventually(accepted, timeout_s=stack.settings.alertmanager.group_wait_s + 60,
                                 what="the trigger service receiving Alertmanager's post", interval_s=1)
        assert after["unauthorized"] == before["unauthorized"]
        assert (after["started"], after["debounced"]) in {(before["started"] + 1, before["debounced"]),
                                                          (before["started"], before["debounced"] + 1)}
    finally:
        rules.unlink(missing_ok=True)
        await _reload(stack)
