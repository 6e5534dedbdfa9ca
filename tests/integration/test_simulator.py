"""`vitrine simulate` against the real stack: what it reports is what reached Kafka, once each, and every
request it made was logged as an exposure whose items are the ones its shoppers reacted to."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.integration.invariants import assert_exactly_once
from vitrine.contracts import topics
from vitrine.services.stack import Stack
from vitrine.services.stack.components import settings_env

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
    views = Counter(e["user_id"] for e in ours if e["type"] == "view")
    assert views == Counter(x["user_id"] for x in shown)
