"""The trigger service without a stack: webhook validation, auth, idempotency and debounce decisions, and the
HTTP handler end to end against a stand-in child process (a real subprocess that sleeps, not a pipeline)."""

from __future__ import annotations

import asyncio
import copy
import json
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import ValidationError

from vitrine.services.triggers.server import TriggerService, authorised
from vitrine.services.triggers.store import TriggerState
from vitrine.services.triggers.webhook import CAUSE_MAX_CHARS, Notification, describe, notification_key
from vitrine.settings import Settings

TOKEN = b"s3cret-token-for-tests-0123456789"


def notification(starts_at: str = "2026-12-01T10:00:00Z", action: str = "retrain", status: str = "firing") -> dict:
    """Alertmanager's webhook body, version 4, as its docs show it."""
    return {
        "version": "4", "groupKey": '{}:{alertname="VitrineFeatureDrift"}', "truncatedAlerts": 0, "status": status,
        "receiver": "vitrine-pipeline", "groupLabels": {"alertname": "VitrineFeatureDrift"},
        "commonLabels": {"alertname": "VitrineFeatureDrift", "action": action}, "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": [{"status": status, "labels": {"alertname": "VitrineFeatureDrift", "action": action, "model": "gru4rec"},
                    "annotations": {"summary": "drift"}, "startsAt": starts_at, "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "http://prometheus/graph", "fingerprint": "a1b2c3d4e5f60718"}],
    }


def test_a_version_4_notification_parses_and_its_retrain_alerts_are_found() -> None:
    parsed = Notification.model_validate(notification())
    assert len(parsed.retrain_alerts("retrain")) == 1
    assert parsed.retrain_alerts("other") == []
    assert Notification.model_validate(notification(status="resolved")).retrain_alerts("retrain") == []


@pytest.mark.parametrize("breakage", ["version", "alerts", "groupKey", "startsAt", "status"])
def test_malformed_notifications_are_refused(breakage: str) -> None:
    body = notification()
    if breakage == "version":
        body["version"] = "3"
    elif breakage == "alerts":
        body["alerts"] = []
    elif breakage == "groupKey":
        del body["groupKey"]
    elif breakage == "startsAt":
        body["alerts"][0]["startsAt"] = "yesterday"
    else:
        body["status"] = "burning"
    with pytest.raises(ValidationError):
        Notification.model_validate(body)


def test_the_notification_key_ignores_repeats_and_alert_order_but_not_a_new_firing() -> None:
    one = Notification.model_validate(notification())
    body = notification()
    body["alerts"].append({**copy.deepcopy(body["alerts"][0]), "fingerprint": "ffff"})
    two = Notification.model_validate(body)
    swapped = copy.deepcopy(body)
    swapped["alerts"].reverse()
    two_swapped = Notification.model_validate(swapped)
    key = notification_key(one, one.retrain_alerts("retrain"))
    assert key == notification_key(Notification.model_validate(notification()), one.retrain_alerts("retrain"))
    assert notification_key(two, two.alerts) == notification_key(two_swapped, two_swapped.alerts)
    later = Notification.model_validate(notification(starts_at="2026-12-02T10:00:00Z"))
    assert notification_key(later, later.alerts) != key


def test_the_bearer_token_is_required_exactly() -> None:
    assert authorised(f"Bearer {TOKEN.decode()}", TOKEN)
    assert not authorised(None, TOKEN)
    assert not authorised(TOKEN.decode(), TOKEN)
    assert not authorised("Bearer wrong", TOKEN)
    assert not authorised(f"Basic {TOKEN.decode()}", TOKEN)
    assert not authorised(f"Bearer {TOKEN.decode()[:-1]}", TOKEN)  # a prefix of the token is not the token
    assert not authorised("Bearer ", TOKEN)
    assert not authorised(f"Bearer {TOKEN.decode()}x", TOKEN)


def test_duplicates_busy_and_debounce_are_decided_in_that_order(tmp_path: Path) -> None:
    state = TriggerState.open(tmp_path / "state.json", debounce_s=600, dedupe_ttl_s=3600)
    assert state.decide("k1", busy=False, now=1000) == "start"
    state.started("k1", "run-1", now=1000)
    assert state.decide("k1", busy=True, now=1001) == "duplicate"
    assert state.decide("k2", busy=True, now=1001) == "busy"
    assert state.decide("k2", busy=False, now=1599) == "debounced"
    assert state.decide("k2", busy=False, now=1600) == "start"
    reopened = TriggerState.open(tmp_path / "state.json", debounce_s=600, dedupe_ttl_s=3600)  # a restarted service
    assert reopened.decide("k1", busy=False, now=2000) == "duplicate" and reopened.last_run_id == "run-1"
    assert reopened.decide("k1", busy=False, now=1000 + 3600) == "start"  # remembered for dedupe_ttl_s only
    assert state.decide(None, busy=False, now=1100) == "debounced"  # the schedule has no key but is debounced too


@pytest.fixture
async def service(tmp_path: Path):
    settings = Settings(stack={"home": tmp_path / "stack"}, triggers={"debounce_s": 0})
    # Stands in for `vitrine pipeline run`: a real child process that lives for a while, then succeeds.
    command = [sys.executable, "-c", "import sys, time; time.sleep(1.5)"]
    service = TriggerService(settings, TOKEN, command=command)
    client = TestClient(TestServer(service.app()))
    await client.start_server()
    yield service, client
    await client.close()
    if service._child is not None and service._child.returncode is None:
        service._child.kill()
        await service._child.wait()


AUTH = {"Authorization": f"Bearer {TOKEN.decode()}"}


async def test_unauthenticated_and_malformed_posts_are_refused_with_a_clear_body(service) -> None:  # noqa: ANN001
    _, client = service
    response = await client.post("/alerts", json=notification())
    assert response.status == 401 and "bearer token" in (await response.json())["error"]
    response = await client.post("/alerts", json=notification(), headers={"Authorization": "Bearer nope"})
    assert response.status == 401
    response = await client.post("/alerts", data=b"{not json", headers=AUTH)
    assert response.status == 400
    body = notification()
    body["version"] = "3"
    response = await client.post("/alerts", json=body, headers=AUTH)
    payload = await response.json()
    assert response.status == 400 and payload["details"][0]["field"] == "version"
    metrics = await (await client.get("/metrics")).text()
    assert 'vitrine_triggers_rejected_total{reason="unauthorized"} 2.0' in metrics
    assert 'vitrine_triggers_rejected_total{reason="malformed"} 2.0' in metrics


async def test_the_same_notification_posted_twice_at_once_starts_one_run(service) -> None:  # noqa: ANN001
    svc, client = service
    first, second = await asyncio.gather(client.post("/alerts", json=notification(), headers=AUTH),
                                         client.post("/alerts", json=notification(), headers=AUTH))
    answers = sorted([(first.status, (await first.json())["status"]), (second.status, (await second.json())["status"])])
    assert answers == [(200, "duplicate"), (202, "started")]
    again = await client.post("/alerts", json=notification(starts_at="2026-12-01T11:00:00Z"), headers=AUTH)
    assert again.status == 200 and (await again.json())["status"] == "busy"  # a new alert while the run goes on
    health = await (await client.get("/healthz")).json()
    assert health["run_in_progress"] is True
    await svc._child.wait()
    await asyncio.sleep(0.05)
    metrics = await (await client.get("/metrics")).text()
    assert 'vitrine_triggers_runs_started_total{trigger="drift"} 1.0' in metrics
    assert 'vitrine_triggers_runs_finished_total{outcome="succeeded"} 1.0' in metrics


async def test_a_notification_without_retrain_alerts_is_ignored(service) -> None:  # noqa: ANN001
    _, client = service
    response = await client.post("/alerts", json=notification(action="page"), headers=AUTH)
    assert response.status == 200 and (await response.json())["status"] == "ignored"


async def test_an_oversized_body_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    settings = Settings(stack={"home": tmp_path / "stack"}, triggers={"max_body_bytes": 1024})
    service = TriggerService(settings, TOKEN, command=[sys.executable, "-c", "pass"])
    async with TestClient(TestServer(service.app())) as client:
        response = await client.post("/alerts", data=b"x" * 4096, headers=AUTH)
        assert response.status == 413 and "1024 bytes" in (await response.json())["error"]
    assert service._child is None


async def test_the_schedule_starts_debounced_runs_with_the_schedule_trigger(tmp_path: Path) -> None:
    settings = Settings(stack={"home": tmp_path / "stack"}, triggers={"debounce_s": 3600})
    argv_file = tmp_path / "argv"
    command = [sys.executable, "-c", f"import sys, pathlib; pathlib.Path({str(argv_file)!r}).write_text(' '.join(sys.argv[1:]))"]
    service = TriggerService(settings, TOKEN, command=command)
    ticking = asyncio.create_task(service.schedule(0.05))
    try:
        for _ in range(200):
            if argv_file.exists() and argv_file.read_text():
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # several more ticks: all debounced
    finally:
        ticking.cancel()
        if service._child is not None:
            await service._child.wait()
    assert argv_file.read_text().startswith("--trigger schedule --run-id ")
    assert service.metrics.started.labels("schedule")._value.get() == 1
    assert service.metrics.rejected.labels("debounced")._value.get() >= 2


async def test_an_alert_starts_the_run_with_its_alerts_named_as_the_cause(tmp_path: Path) -> None:
    settings = Settings(stack={"home": tmp_path / "stack"})
    argv_file = tmp_path / "argv"
    command = [sys.executable, "-c", f"import sys, json, pathlib; pathlib.Path({str(argv_file)!r}).write_text(json.dumps(sys.argv[1:]))"]
    service = TriggerService(settings, TOKEN, command=command)
    async with TestClient(TestServer(service.app())) as client:
        response = await client.post("/alerts", json=notification(), headers=AUTH)
        assert response.status == 202
        await service._child.wait()
    argv = json.loads(argv_file.read_text())
    assert argv[:2] == ["--trigger", "drift"] and argv[argv.index("--cause") + 1] == (
        'VitrineFeatureDrift{model="gru4rec"} since 2026-12-01T10:00:00+00:00')


def test_a_cause_names_every_alert_in_a_stable_order_and_is_cut_to_its_limit() -> None:
    body = notification()
    second = copy.deepcopy(body["alerts"][0])
    second["labels"]["model"] = "sasrec"
    body["alerts"] = [second, body["alerts"][0]]
    cause = describe(Notification.model_validate(body).alerts)
    assert cause.index('model="gru4rec"') < cause.index('model="sasrec"') and "action" not in cause
    body["alerts"] = [copy.deepcopy(second) for _ in range(100)]
    for n, alert in enumerate(body["alerts"]):
        alert["labels"]["feature"] = f"f{n:03d}" * 10
    long = describe(Notification.model_validate(body).alerts)
    assert len(long) == CAUSE_MAX_CHARS and long.endswith("…")
