"""Prometheus → Alertmanager → the pipeline trigger's webhook, on the real stack.

A test-only rule file (in the stack's prometheus/rules.d/, loaded by a reload) makes two alerts fire at once:
one labelled `action: retrain`, one not. Alertmanager must hold both, route only the first to the pipeline
trigger, and POST it to the trigger's URL with the stack's bearer token — received here by a minimal HTTP
listener standing in for the trigger service, which does not exist yet."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from tests.integration.invariants import eventually
from vitrine.services.stack import Stack
from vitrine.services.stack.components import EXTRA_RULES_DIR, pipeline_trigger_token_file

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
    received: list[tuple[str | None, dict]] = []
    got_it = asyncio.Event()

    async def webhook(request: web.Request) -> web.Response:
        received.append((request.headers.get("Authorization"), await request.json()))
        got_it.set()
        return web.Response(text="ok")

    trigger = stack.settings.pipeline_trigger
    app = web.Application()
    app.router.add_post(trigger.path, webhook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, trigger.host, trigger.port).start()
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

        # The webhook: after group_wait, one POST for the retrain group only, with the stack's bearer token.
        await asyncio.wait_for(got_it.wait(), timeout=stack.settings.alertmanager.group_wait_s + 60)
        authorization, body = received[0]
        assert authorization == f"Bearer {pipeline_trigger_token_file(stack.settings).read_text().strip()}"
        assert body["receiver"] == "pipeline-trigger" and body["status"] == "firing"
        assert body["groupLabels"] == {"alertname": retrain}
        assert [a["labels"]["alertname"] for a in body["alerts"]] == [retrain]
        assert body["alerts"][0]["labels"]["action"] == "retrain"
        assert all(other not in json.dumps(b) for _, b in received)
    finally:
        rules.unlink(missing_ok=True)
        await _reload(stack)
        await runner.cleanup()
