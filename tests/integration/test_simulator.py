"""`vitrine simulate` against the real stack: what it reports is what reached Kafka, once each, and every
request it made was logged as an exposure whose items are the ones its shoppers reacted to; its shoppers'
pre-period lies before their first exposure, the outcome service counts it as `pre_events`, and CUPED
then removes a share of the CTR's variance on the running stack."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.integration.invariants import assert_exactly_once, eventually
from vitrine.contracts import topics
from vitrine.experiments.analysis import analyse
from vitrine.services.gateway.client import GatewayClient
from vitrine.services.outcomes.store import OutcomeStore
from vitrine.services.simulator.runner import Simulation, SimulationConfig
from vitrine.services.stack import Stack
from vitrine.services.stack.components import settings_env
from vitrine.v1 import recommender_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


async def _ends(consumer: AIOKafkaConsumer, topic: str, partitions: int) -> dict[TopicPartition, int]:
    return await consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])


async def _read(consumer: AIOKafkaConsumer, start: dict[TopicPartition, int], end: dict[TopicPartition, int]) -> list[bytes]:
    """Every record between two pinned positions of each partition: a condition (positions reach the ends), no timed poll."""
    consumer.assign(list(start))
    for tp, offset in start.items():
        consumer.seek(tp, offset)
    values: list[bytes] = []
    remaining = {tp for tp in start if end[tp] > start[tp]}
    while remaining:
        for tp, messages in (await consumer.getmany(*remaining, timeout_ms=1000)).items():
            values += [m.value for m in messages if m.offset < end[tp]]
            if await consumer.position(tp) >= end[tp]:
                remaining.discard(tp)
    return values


async def test_simulated_shoppers_events_reach_kafka_once_and_their_requests_are_exposures(stack: Stack, tmp_path: Path) -> None:
    settings = stack.settings
    partitions = settings.kafka.partitions
    prefix = f"simtest-{uuid.uuid4().hex[:6]}-"
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        before_events = await _ends(consumer, topics.EVENTS, partitions)
        before_exposures = await _ends(consumer, topics.RECS_SERVED, partitions)

        out = tmp_path / "simulate.json"
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vitrine", "simulate", "--rate", "25", "--duration", "4", "--seed", "11", "--users", "60",
            "--user-prefix", prefix, "--dwell", "0.05", "--k", "6", "--no-progress", "--json", str(out),
            env={**os.environ, **settings_env(settings)}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
        assert process.returncode == 0, stderr.decode()[-3000:]
        report = json.loads(out.read_text())
        assert report["requests"] > 50 and not report["errors"] and report["skipped"] == 0, report
        assert report["run_id"] in stdout.decode()

        # Everything the simulator had acknowledged lies before these ends.
        events = [json.loads(v) for v in await _read(consumer, before_events, await _ends(consumer, topics.EVENTS, partitions))]
        exposures = [json.loads(v) for v in await _read(consumer, before_exposures, await _ends(consumer, topics.RECS_SERVED, partitions))]
    finally:
        await consumer.stop()

    ours = [e for e in events if e["user_id"].startswith(prefix)]
    ids = [e["event_id"] for e in ours]
    assert len(ours) == report["events_sent"]
    assert_exactly_once(ids, set(ids))
    assert Counter(e["type"] for e in ours) == Counter(report["events"])
    assert all(i.startswith(f"sim-{report['run_id']}-") for i in ids)

    shown = [x for x in exposures if x["user_id"].startswith(prefix)]
    # No error and nothing skipped: every visit due made exactly one request, logged once.
    assert_exactly_once([x["request_id"] for x in shown], {f"sim-{report['run_id']}-{n}" for n in range(report["visits_due"])})
    assert len(shown) == report["requests"]
    # Per variant, the exposures say what the simulator counted (requests and impressions).
    by_variant: dict[str, Counter] = {}
    for x in shown:
        c = by_variant.setdefault(x["variant"], Counter())
        c["requests"] += 1
        c["impressions"] += len(x["item_ids"])
    assert {v: dict(c) for v, c in by_variant.items()} == {
        v: {"requests": t["requests"], "impressions": t["impressions"]} for v, t in report["variants"].items()}
    # Shoppers react to what they were shown: every click is on an item of an earlier exposure of the same shopper
    # (plain-Python reference from the two topics), and every request followed a view of the page's item.
    exposed: dict[str, list[tuple[int, set[str]]]] = {}
    for x in shown:
        exposed.setdefault(x["user_id"], []).append((x["ts_ms"], set(x["item_ids"])))
    clicks = [e for e in ours if e["type"] == "click"]
    assert clicks, "no click in the whole run: the choice model or the gateway's answers are broken"
    for click in clicks:
        assert any(click["item_id"] in items and ts <= click["ts_ms"] for ts, items in exposed[click["user_id"]]), click
    history = [e for e in ours if e["event_id"].startswith(f"sim-{report['run_id']}-h")]
    views = Counter(e["user_id"] for e in ours if e["type"] == "view" and e not in history)
    assert views == Counter(x["user_id"] for x in shown)
    # The pre-period (on by default): every shopper who was shown something had one, all of it dated before her first
    # exposure (the gateway's clock) and within the outcome service's look-back of it.
    assert Counter(e["type"] for e in history) == Counter(report["pre_period"]) and "click" not in report["pre_period"]
    first_shown = {user: min(ts for ts, _ in xs) for user, xs in exposed.items()}
    assert {e["user_id"] for e in history} <= set(first_shown) and report["pre_period_shoppers"] == len(first_shown)
    lookback_ms = settings.outcomes.dedupe_window_s * 1000
    assert all(first_shown[e["user_id"]] - lookback_ms < e["ts_ms"] < first_shown[e["user_id"]] for e in history)
    assert len({e["user_id"] for e in history}) > 0.8 * len(first_shown)


EXPERIMENTER = "vitrine-demo-experimenter"


CUPED_RUN = {"rate": 50.0, "duration_s": 12.0, "users": 400, "dwell_s": 0.05}
"""The CUPED test's simulation: 600 visits of about 260 distinct shoppers of 400 (drawn by activity, so the busy ones return)."""


async def _experiment_run(stack: Stack, seed: int) -> tuple[list, dict, list[dict], list[dict], pb.Experiment, str]:
    """An A/B revision (popularity vs gru4rec) on the stack's gateway, simulated shoppers with their pre-period; returns,
    once the outcome service has joined every answer and read every record of the run (its stored offsets reach the
    topics' ends): the revision's outcome rows of these shoppers, the simulator's report, the run's events and
    exposures (both topics between their ends before and after), the applied experiment and the shoppers' prefix.
    The previous experiment is restored."""
    settings = stack.settings
    partitions = settings.kafka.partitions
    async with GatewayClient(settings.gateway.address, EXPERIMENTER) as admin:
        previous = await admin.get_experiment()
        applied = await admin.set_experiment(pb.Experiment(name=previous.name, salt=previous.salt, mode="ab", variants=[
            pb.Variant(name="control", model_name="popularity", weight=50), pb.Variant(name="treatment", model_name="gru4rec", weight=50)]))
    prefix = f"cuped-{uuid.uuid4().hex[:6]}-"
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, enable_auto_commit=False)
    client = aioredis.Redis(host=settings.redis.host, port=settings.redis.port)
    store = OutcomeStore(client, settings.outcomes)
    await consumer.start()
    try:
        before = {t: await _ends(consumer, t, partitions) for t in (topics.EVENTS, topics.RECS_SERVED)}
        config = SimulationConfig(seed=seed, user_prefix=prefix, **CUPED_RUN)
        report = await Simulation(settings, config).run()
        assert report.requests > 0.9 * config.rate * config.duration_s and not report.errors, report.to_dict()

        async def joined() -> bool | None:  # the gateway logs exposures asynchronously: first every answer joined …
            rows = await store.user_outcomes(applied.name, applied.revision)
            return True if sum(r.exposures for r in rows if r.user_id.startswith(prefix)) >= report.requests else None

        await eventually(joined, 60, "the outcome service to join every simulated answer")
        ends = {t: await _ends(consumer, t, partitions) for t in before}  # … then every event (acknowledged before) read

        async def read_all() -> bool | None:
            stored = await store.stored_offsets(settings.outcomes.group_id)
            behind = [tp for t in ends for tp, end in ends[t].items() if stored.get((t, tp.partition), -1) < end]
            return None if behind else True

        await eventually(read_all, 60, "the outcome service to read every record of the simulated run")
        rows = [r for r in await store.user_outcomes(applied.name, applied.revision) if r.user_id.startswith(prefix)]
        events = [json.loads(v) for v in await _read(consumer, before[topics.EVENTS], ends[topics.EVENTS])]
        exposures = [json.loads(v) for v in await _read(consumer, before[topics.RECS_SERVED], ends[topics.RECS_SERVED])]
    finally:
        await consumer.stop()
        await client.aclose()
        async with GatewayClient(settings.gateway.address, EXPERIMENTER) as admin:
            await admin.set_experiment(pb.Experiment(name=previous.name, salt=previous.salt, mode=previous.mode, variants=previous.variants))
    return rows, report.to_dict(), events, exposures, applied, prefix


def _cuped_line(rows: list, analysis) -> str:  # noqa: ANN001
    return (f"{len(rows)} users, pre_events mean {sum(r.pre_events for r in rows) / len(rows):.1f}, CUPED variance reduction "
            + ", ".join(f"{c.metric} {c.cuped.variance_reduction:.1%}" for c in analysis.comparisons if c.cuped))


async def test_cuped_reduces_the_variance_of_a_simulated_experiment_with_a_pre_period(stack: Stack) -> None:
    """Simulated shoppers with their pre-period in an A/B revision (`_experiment_run`): each user's `pre_events` equals
    the count of her events before her first exposure computed from the two topics in plain Python, most users have a
    history, and CUPED on `pre_events` removes a share of the CTR's variance that a covariate unrelated to the clicks
    would not (with ~260 users an unrelated one removes about ρ̂² ~ χ²₁/260: above 5 % with probability < 0.1 %; five runs
    of this size removed 25–30 %)."""
    rows, report, events, exposures, applied, prefix = await _experiment_run(stack, seed=23)

    # Reference in plain Python: a user's events (any type, distinct ids) dated before her first exposure of the revision.
    first: dict[str, int] = {}
    for x in exposures:
        if x["user_id"].startswith(prefix) and x["experiment"] == applied.name and x["revision"] == applied.revision:
            first[x["user_id"]] = min(first.get(x["user_id"], x["ts_ms"]), x["ts_ms"])
    before_first = Counter(e["user_id"] for e in {e["event_id"]: e for e in events}.values()
                           if e["user_id"] in first and e["ts_ms"] < first[e["user_id"]])
    assert sum(r.exposures for r in rows) == report["requests"] and len(rows) == len(first)
    assert {r.user_id: r.pre_events for r in rows} == {u: before_first[u] for u in first}
    # Beyond the view that precedes the first request, most users have a history.
    assert sum(r.pre_events > 1 for r in rows) > 0.8 * len(rows), sorted(r.pre_events for r in rows)

    analysis = analyse(rows, {"control": 50, "treatment": 50}, "control")
    assert analysis.covariate_used
    ctr = next(c for c in analysis.comparisons if c.metric == "ctr")
    print(f"\nCUPED on the stack: {_cuped_line(rows, analysis)}; pre-period sent in {report['pre_period_s']:.2f}s")
    assert ctr.cuped.variance_reduction > 0.05, ctr
