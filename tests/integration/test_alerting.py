"""Prometheus → Alertmanager routing on the real stack: an alert for people stays away from the pipeline trigger.

A test-only rule file (in the stack's prometheus/rules.d/, loaded by a reload) makes an alert fire that carries no
`action: retrain`. Alertmanager must hold it and route it to the null receiver only. The other half — a retrain alert
routed to the trigger service's webhook, with the stack's bearer token, starting a pipeline run — is proven with the
production drift rule and real drifted traffic in test_observability.py (the drift alert ends in a loaded challenger);
amtool checks the routing table itself (tests/unit/test_alertmanager_config.py)."""

from __future__ import annotations

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


def _rules(name: str) -> str:
    return f"""groups:
  - name: vitrine-test-alert-path
    rules:
      - alert: {name}
        expr: vector(1)
        for: {FIRE_AFTER}
        labels: {{severity: page}}
        annotations: {{summary: "test-only: an alert for people"}}
"""


async def _reload(stack: Stack) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        (await client.post(f"{stack.settings.prometheus.url}/-/reload")).raise_for_status()


async def test_an_alert_without_a_retrain_action_is_routed_to_the_null_receiver_only(stack: Stack) -> None:
    name = f"VitrineTestPage{uuid.uuid4().hex[:8]}"
    rules = Path(stack.settings.stack.home) / "prometheus" / EXTRA_RULES_DIR / f"test-alert-path-{name}.yml"
    rules.write_text(_rules(name))
    try:
        await _reload(stack)

        async def in_alertmanager() -> list[str] | None:
            async with httpx.AsyncClient(timeout=5) as client:
                alerts = (await client.get(f"{stack.settings.alertmanager.url}/api/v2/alerts")).json()
            return next(([r["name"] for r in a["receivers"]] for a in alerts if a["labels"]["alertname"] == name), None)

        receivers = await eventually(in_alertmanager, timeout_s=90, what="the test alert in Alertmanager", interval_s=1)
        assert receivers == ["null"]
    finally:
        rules.unlink(missing_ok=True)
        await _reload(stack)
