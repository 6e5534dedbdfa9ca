"""The outcome service against the real Kafka and Redis: each test has its own two topics, DLQ, consumer group
and key namespace. The service runs as `vitrine outcomes run` subprocesses configured through the environment
as `vitrine stack up` configures its own; waits are on stored offsets, never fixed sleeps. Every result is
compared with `outcome_reference` (plain Python, all records at once) on the same records.

The service runs with a realistic `max_lateness` (1 h): pruning is on and forgets creditable events in every test's
traffic. Where that depends on arrival, the tests publish every event first and wait until it is joined, then the
exposures — the order the reference models (see its docstring)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import httpx
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.integration import outcome_reference
from tests.integration.invariants import eventually
from tests.integration.kafka_reads import polled
from vitrine.contracts.events import Event, EventType
from vitrine.contracts.exposures import Exposure
from vitrine.services.outcomes.store import OutcomeStore
from vitrine.services.stack import Stack
from vitrine.services.stack.components import settings_env
from vitrine.services.stack.health import outcomes_ready
from vitrine.services.stack.launcher import free_port
from vitrine.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
PARTITIONS = 4
MIN = 60_000
LATENESS_S = 3600


@dataclass
class Lane:
    """One test's private topics, consumer group and Redis namespace on the shared stack."""

    settings: Settings
    store: OutcomeStore

    @property
    def cfg(self):  # noqa: ANN201
        return self.settings.outcomes

    def start(self, **overrides: object) -> tuple[subprocess.Popen, Settings]:
        outcomes = self.cfg.model_copy(update={"metrics_port": free_port(), **overrides})
        settings = self.settings.model_copy(update={"outcomes": outcomes})
        process = subprocess.Popen([sys.executable, "-m", "vitrine", "outcomes", "run"], env={**os.environ, **settings_env(settings)},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return process, settings

    async def processed(self) -> int:
        return sum((await self.store.stored_offsets(self.cfg.group_id)).values())

    async def wait_processed(self, records: int, timeout_s: float = 90) -> None:
        async def done() -> bool | None:
            return True if await self.processed() >= records else None

        await eventually(done, timeout_s, f"{records} records processed", interval_s=0.05)

    def windows_ms(self) -> dict[str, int]:
        return {"click": self.cfg.click_window_s * 1000, "add_to_cart": self.cfg.add_to_cart_window_s * 1000,
                "purchase": self.cfg.purchase_window_s * 1000}


@pytest.fixture
async def lane(stack: Stack):
    tag = uuid.uuid4().hex[:8]
    base = stack.settings
    outcomes = base.outcomes.model_copy(update={
        "exposures_topic": f"served.test-{tag}", "events_topic": f"events.otest-{tag}", "dlq_topic": f"outcomes.dlq.test-{tag}",
        "group_id": f"otest-{tag}", "namespace": f"o{tag}",
        "max_lateness_s": LATENESS_S,  # pruning on: the reference applies the same horizon
    })
    settings = base.model_copy(update={"outcomes": outcomes})
    admin = AIOKafkaAdminClient(bootstrap_servers=base.kafka.bootstrap_servers)
    await admin.start()
    names = [outcomes.exposures_topic, outcomes.events_topic, outcomes.dlq_topic]
    await admin.create_topics([NewTopic(name, num_partitions=PARTITIONS, replication_factor=1) for name in names])
    client = aioredis.Redis(host=base.redis.host, port=base.redis.port)
    yield Lane(settings, OutcomeStore(client, outcomes))
    await admin.delete_topics(names)
    await admin.close()
    async for key in client.scan_iter(match=f"{outcomes.namespace}:*", count=1000):
        await client.delete(key)
    await client.aclose()


async def _ready(process: subprocess.Popen, settings: Settings) -> None:
    async def check() -> bool | None:
        if process.poll() is not None:
            raise AssertionError(f"outcome service exited with {process.returncode}: {process.stderr.read().decode()[-2000:]}")
        return True if await outcomes_ready(settings) is None else None

    await eventually(check, 60, "the outcome service to own its partitions", interval_s=0.1)


async def _metric(settings: Settings, name: str, labels: str = "") -> float:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"http://127.0.0.1:{settings.outcomes.metrics_port}/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and labels in line and not line.startswith("#"))


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def _traffic(tag: str, seed: int, users: int = 60, items: int = 40) -> tuple[list[Exposure], list[Event]]:
    """A few hours of one experiment in two revisions (A/B), and an interleaving experiment: exposures, and
    events that answer them (inside and outside the windows, on shown and unshown items), views before the
    first exposure, events of users never exposed, and users shown another variant than their first in the same
    revision (a variant conflict). Every record is at least an hour in the past."""
    rng = random.Random(seed)
    t0 = int(time.time() * 1000) - 8 * 3_600_000
    exposures: list[Exposure] = []
    events: list[Event] = []
    catalogue = [f"item-{i}" for i in range(items)]
    kinds = [EventType.CLICK, EventType.ADD_TO_CART, EventType.PURCHASE]
    for u in range(users):
        user = f"user-{seed}-{u}"
        variant = rng.choice(["control", "treatment"])
        for v in range(rng.randrange(3)):
            events.append(Event(event_id=f"pre-{seed}-{u}-{v}", user_id=user, item_id=rng.choice(catalogue), type=EventType.VIEW,
                                ts_ms=t0 - rng.randrange(1, 60) * MIN))
        if u % 10 == 9:
            continue  # never exposed: their events credit nothing
        interleaved = u % 4 == 0
        ts = t0
        for n in range(rng.randrange(1, 6)):
            ts += rng.randrange(0, 40) * MIN + rng.randrange(1000)
            shown = rng.sample(catalogue, 6)
            revision = 1 if ts < t0 + 60 * MIN else 2
            if interleaved:
                slots = [rng.choice(["gru4rec", "popular"]) for _ in shown]
                x = Exposure(request_id=f"req-{seed}-{u}-{n}", user_id=user, ts_ms=ts, variant="interleave", model_name="m",
                             model_version="1", item_ids=shown, scores=[1.0] * 6, latency_ms=2.0, degraded=False,
                             experiment=f"il-{tag}", revision=1, mode="interleave", slot_variants=slots)
            else:
                conflict = u % 7 == 3 and n == 1  # this answer came from another variant (e.g. a second gateway's stale split)
                x = Exposure(request_id=f"req-{seed}-{u}-{n}", user_id=user, ts_ms=ts,
                             variant=({"control": "treatment", "treatment": "control"}[variant] if conflict else variant), model_name="m",
                             model_version="1", item_ids=shown, scores=[1.0] * 6, latency_ms=2.0, degraded=False,
                             experiment=f"ab-{tag}", revision=revision)
            exposures.append(x)
            for k in range(rng.randrange(4)):
                kind = rng.choices(kinds, weights=[6, 2, 1])[0]
                item = rng.choice(shown) if rng.random() < 0.8 else rng.choice(catalogue)
                delay = rng.choice([rng.randrange(0, 25) * MIN, rng.randrange(0, 200) * MIN, 0])
                events.append(Event(event_id=f"ev-{seed}-{u}-{n}-{k}", user_id=user, item_id=item, type=kind, ts_ms=ts + delay))
    for i in range(40):
        events.append(Event(event_id=f"stranger-{seed}-{i}", user_id=f"stranger-{seed}-{i % 7}", item_id=rng.choice(catalogue),
                            type=rng.choice(kinds), ts_ms=t0 + rng.randrange(300) * MIN))
    return exposures, events


async def _publish(lane: Lane, exposures: list[Exposure], events: list[Event]) -> int:
    """Keyed by user, as the gateway and the shop publish: a user's records of both topics share a partition number."""
    producer = AIOKafkaProducer(bootstrap_servers=lane.settings.kafka.bootstrap_servers, acks="all", linger_ms=5)
    await producer.start()
    try:
        sends = [await producer.send(lane.cfg.exposures_topic, value=x.model_dump_json().encode(), key=x.user_id.encode())
                 for x in exposures]
        sends += [await producer.send(lane.cfg.events_topic, value=e.to_json(), key=e.user_id.encode()) for e in events]
        for future in sends:
            await future
    finally:
        await producer.stop()
    return len(sends)


async def _assert_matches_reference(lane: Lane, exposures: list[Exposure], events: list[Event]) -> outcome_reference.Expected:
    """The rows equal the reference's, with the service's lateness horizon (events joined before exposures)."""
    expected = outcome_reference.compute(exposures, events, lane.windows_ms(), max_lateness_ms=lane.cfg.max_lateness_s * 1000)
    assert expected.users and expected.interleaved, "the traffic has no rows or no interleaving: the test proves little"
    assert sum(r.clicks for rows in expected.users.values() for r in rows) > 20, "too few attributed clicks to prove anything"
    assert expected.forgotten > 0, "no event was beyond the horizon: the test does not prove pruning"
    assert expected.conflicts > 0, "no variant conflict in the traffic: the test does not prove they are ignored"
    for (experiment, revision), rows in expected.users.items():
        assert await lane.store.user_outcomes(experiment, revision) == rows, (experiment, revision)
    for (experiment, revision), rows in expected.interleaved.items():
        assert await lane.store.interleaved_outcomes(experiment, revision) == rows, (experiment, revision)
    for experiment, revisions in expected.revisions.items():
        assert await lane.store.revisions(experiment) == revisions
    return expected


async def test_attribution_equals_a_plain_python_reference_with_events_first_and_duplicates(lane: Lane) -> None:
    """Every event is published (and joined) before any exposure it answers; then the exposures; then duplicates
    of both in another order (a producer retry, a replay). The rows equal the reference's, counted once."""
    exposures, events = _traffic(lane.cfg.group_id, seed=1)
    process, settings = lane.start()
    try:
        await _ready(process, settings)
        total = await _publish(lane, [], events)
        await lane.wait_processed(total)
        assert not await lane.store.user_outcomes(f"ab-{lane.cfg.group_id}", 1)
        total += await _publish(lane, exposures, [])
        await lane.wait_processed(total)
        expected = await _assert_matches_reference(lane, exposures, events)
        assert await _metric(settings, "vitrine_outcomes_variant_conflicts_total") == expected.conflicts  # counted, not credited
        rng = random.Random(2)
        again_x, again_e = rng.sample(exposures, len(exposures) // 2), rng.sample(events, len(events) // 2)
        total += await _publish(lane, again_x, again_e)
        await lane.wait_processed(total)
        await _assert_matches_reference(lane, exposures + again_x, events + again_e)
        assert await _metric(settings, "vitrine_outcomes_duplicates_total", 'kind="exposure"') == len(again_x)
        assert await _metric(settings, "vitrine_outcomes_duplicates_total", 'kind="event"') == len(again_e)
        impressions = sum(r.impressions for rows in expected.users.values() for r in rows)  # conflicting exposures not among them
        assert await _metric(settings, "vitrine_outcomes_impressions_total") == impressions
        assert await _metric(settings, "vitrine_outcomes_variant_conflicts_total") == expected.conflicts  # duplicates are not conflicts
    finally:
        _stop(process)
    assert process.returncode == 0, process.stderr.read().decode()[-2000:]


async def test_a_service_killed_mid_stream_and_restarted_ends_equal_to_the_reference(lane: Lane) -> None:
    """SIGKILL mid-stream, restart: the rows equal the reference (nothing lost, nothing counted twice), and the
    restart resumed exactly at Redis's offsets (Kafka's commits are kept a minute behind on purpose)."""
    exposures, events = _traffic(lane.cfg.group_id, seed=3, users=400)
    first, settings = lane.start(max_batch=20, commit_interval_s=60)
    try:
        await _ready(first, settings)
        joined_events = await _publish(lane, [], events)
        await lane.wait_processed(joined_events)  # events first: the order the reference's horizon models
        total = joined_events + await _publish(lane, exposures, [])

        async def partway() -> bool | None:
            return True if await lane.processed() >= joined_events + len(exposures) // 5 else None

        await eventually(partway, 90, "a fifth of the exposures", interval_s=0.01)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        at_kill = await lane.processed()
        assert at_kill < total, "the service finished before it could be killed; the test proved nothing"
    finally:
        if first.poll() is None:
            first.kill()
    second, settings = lane.start()
    try:
        await lane.wait_processed(total)
        await _assert_matches_reference(lane, exposures, events)
        consumed = (await _metric(settings, "vitrine_outcomes_exposures_consumed_total")
                    + await _metric(settings, "vitrine_outcomes_events_consumed_total"))
        assert consumed == total - at_kill
        assert await _metric(settings, "vitrine_outcomes_duplicates_total") == 0
    finally:
        _stop(second)
    assert second.returncode == 0, second.stderr.read().decode()[-2000:]


async def test_bad_records_go_to_the_dlq_with_reasons_and_the_good_ones_around_them_are_joined(lane: Lane) -> None:
    exposures, events = _traffic(lane.cfg.group_id, seed=5)
    now_ms = int(time.time() * 1000)
    good_x = exposures[0].model_dump()
    bad = {
        (lane.cfg.exposures_topic, b"not json at all"): "not_json",
        (lane.cfg.exposures_topic, json.dumps({"request_id": "r", "user_id": "u"}).encode()): "missing_field",
        (lane.cfg.exposures_topic, json.dumps({**good_x, "request_id": "bad-1", "ts_ms": 12}).encode()): "absurd_timestamp",
        (lane.cfg.exposures_topic, json.dumps({**good_x, "request_id": "bad-2", "mode": "interleave", "slot_variants": []}).encode()): "invalid_field",
        (lane.cfg.exposures_topic, events[0].to_json()): "missing_field",  # a foreign record: an event on the exposure topic
        (lane.cfg.events_topic, exposures[1].model_dump_json().encode()): "missing_field",  # and an exposure on the event topic
        (lane.cfg.events_topic, json.dumps({"event_id": "x", "user_id": "u", "item_id": "i", "type": "wishlist", "ts_ms": now_ms}).encode()): "unknown_type",
    }
    bad[(lane.cfg.exposures_topic, json.dumps({**good_x, "request_id": "bad-3", "experiment": "spring\x1fsale"}).encode())] = "invalid_field"
    # Stored state a damaged or older writer left: a row under a name with the separator (written before names were
    # validated: it decodes from the right), and fields that do not decode at all (skipped and counted, never fatal).
    victim = exposures[0].user_id
    await lane.store.client.hset(lane.store.user_key(victim, "m"), mapping={
        "r\x1fspring\x1fsale\x1f4": "control\x1f1", "r\x1fbroken": "control\x1f1", "r\x1fexp\x1f7": "no-separator"})
    await lane.store.client.hset(lane.store.user_key(victim, "p"), "garbage-event", "{not json")
    dlq = AIOKafkaConsumer(lane.cfg.dlq_topic, bootstrap_servers=lane.settings.kafka.bootstrap_servers, auto_offset_reset="earliest")
    await dlq.start()
    process, settings = lane.start()
    producer = AIOKafkaProducer(bootstrap_servers=lane.settings.kafka.bootstrap_servers, acks="all")
    await producer.start()
    try:
        await _ready(process, settings)
        total = await _publish(lane, [], events)
        await lane.wait_processed(total)
        total += await _publish(lane, exposures[: len(exposures) // 2], [])
        for (topic, value) in bad:
            await (await producer.send(topic, value=value, key=exposures[0].user_id.encode()))
        total += len(bad) + await _publish(lane, exposures[len(exposures) // 2:], [])
        await lane.wait_processed(total)
        await _assert_matches_reference(lane, exposures, events)
        dead: dict[tuple[str, bytes], str] = {}

        async def all_dead() -> bool | None:
            for message in await polled(dlq, 200):
                headers = dict(message.headers)
                assert headers["detail"]
                dead[(headers["source"].decode().rsplit(":", 2)[0], message.value)] = headers["reason"].decode()
            return True if len(dead) >= len(bad) else None

        await eventually(all_dead, 30, f"{len(bad)} records in the DLQ", interval_s=0)
        assert dead == bad
        for reason in set(bad.values()):
            assert await _metric(settings, "vitrine_outcomes_records_rejected_total", f'reason="{reason}"') == list(bad.values()).count(reason)
        assert process.poll() is None  # bad input never kills the service
        assert await _metric(settings, "vitrine_outcomes_corrupt_state_fields_total", 'part="meta"') >= 2
        assert await _metric(settings, "vitrine_outcomes_corrupt_state_fields_total", 'part="pending"') >= 1
    finally:
        await producer.stop()
        await dlq.stop()
        _stop(process)


async def _dump(client: aioredis.Redis, namespace: str) -> dict[bytes, tuple[bytes, int]]:
    """Every key of the namespace as DUMP payload and remaining TTL: a copy to roll Redis back to."""
    return {key: (await client.dump(key), max(0, await client.pttl(key))) async for key in client.scan_iter(match=f"{namespace}:*", count=1000)}


async def _roll_back(client: aioredis.Redis, namespace: str, copy: dict[bytes, tuple[bytes, int]]) -> None:
    """Redis as it was when `copy` was taken, in one transaction (as after a restart from an older AOF or replica)."""
    keys = [key async for key in client.scan_iter(match=f"{namespace}:*", count=1000)]
    async with client.pipeline(transaction=True) as pipe:
        if keys:
            pipe.delete(*keys)
        for key, (payload, ttl) in copy.items():
            pipe.restore(key, ttl, payload, replace=True)
        await pipe.execute()


async def test_a_redis_rollback_and_lost_offsets_are_replayed_to_the_same_rows_and_rejects_are_not_sent_twice(lane: Lane) -> None:
    """Redis rolled back to before the exposures (rows and offsets together): the running service notices while idle,
    rewinds to the stored offsets and ends with the reference's rows — nothing counted twice, the bad records of the
    replayed stretch not sent to the DLQ (nor counted) again. Then the offsets alone are lost while the service is
    down: on assignment it reads every partition from the beginning (no stored offset means nothing of it is stored),
    so every record is read again and is a duplicate: same rows."""
    exposures, events = _traffic(lane.cfg.group_id, seed=7)
    bad = [b"not json", json.dumps({"request_id": "r", "user_id": "u"}).encode()]
    process, settings = lane.start()
    dlq = AIOKafkaConsumer(lane.cfg.dlq_topic, bootstrap_servers=lane.settings.kafka.bootstrap_servers, auto_offset_reset="earliest")
    await dlq.start()
    producer = AIOKafkaProducer(bootstrap_servers=lane.settings.kafka.bootstrap_servers, acks="all")
    await producer.start()
    try:
        await _ready(process, settings)
        total = await _publish(lane, [], events)
        await lane.wait_processed(total)
        before_exposures = await _dump(lane.store.client, lane.cfg.namespace)
        for value in bad:
            await (await producer.send(lane.cfg.exposures_topic, value=value, key=exposures[0].user_id.encode()))
        total += len(bad) + await _publish(lane, exposures, [])
        await lane.wait_processed(total)
        await _assert_matches_reference(lane, exposures, events)
        assert await _metric(settings, "vitrine_outcomes_records_rejected_total") == len(bad)

        await _roll_back(lane.store.client, lane.cfg.namespace, before_exposures)
        assert await lane.processed() < total
        await lane.wait_processed(total)
        assert await _metric(settings, "vitrine_outcomes_offset_rewinds_total") >= 1
        await _assert_matches_reference(lane, exposures, events)
        assert await _metric(settings, "vitrine_outcomes_duplicates_total") == 0  # the rolled-back stretch was joined once
        assert await _metric(settings, "vitrine_outcomes_records_rejected_total") == len(bad)
        dead: list[bytes] = []

        async def dead_lettered() -> bool | None:
            dead.extend(m.value for m in await polled(dlq, 200))
            return True if len(dead) >= len(bad) else None

        await eventually(dead_lettered, 30, "the rejects in the DLQ", interval_s=0)
        dead.extend(m.value for m in await polled(dlq, 500))
        assert sorted(dead) == sorted(bad)  # once each
    finally:
        await producer.stop()
        await dlq.stop()
        _stop(process)
    assert process.returncode == 0, process.stderr.read().decode()[-2000:]

    await lane.store.client.delete(lane.store.offsets_key(lane.cfg.group_id))  # Kafka's commits still say "all read"
    again, settings = lane.start()
    try:
        await lane.wait_processed(total)
        await _assert_matches_reference(lane, exposures, events)
        assert await _metric(settings, "vitrine_outcomes_duplicates_total") == total - len(bad)  # every valid record read again
    finally:
        _stop(again)
    assert again.returncode == 0, again.stderr.read().decode()[-2000:]


async def test_two_members_split_the_partitions_and_together_equal_the_reference(lane: Lane) -> None:
    """Two services in one group: both own partitions and join records, none is joined twice, and the rows (with
    variant conflicts counted, not credited) equal the reference."""
    exposures, events = _traffic(lane.cfg.group_id, seed=9, users=120)
    members = [lane.start(), lane.start()]
    try:
        for process, settings in members:
            await _ready(process, settings)

        async def split() -> bool | None:  # the group settled: every partition of both topics owned, by both members
            owned = [await _metric(s, "vitrine_outcomes_assigned_partitions") for _, s in members]
            return True if sum(owned) == 2 * PARTITIONS and all(owned) else None

        await eventually(split, 60, "both members to own partitions", interval_s=0.1)
        total = await _publish(lane, [], events)
        await lane.wait_processed(total)
        total += await _publish(lane, exposures, [])
        await lane.wait_processed(total)
        expected = await _assert_matches_reference(lane, exposures, events)
        consumed = [await _metric(s, "vitrine_outcomes_exposures_consumed_total") + await _metric(s, "vitrine_outcomes_events_consumed_total")
                    for _, s in members]
        assert all(n > 0 for n in consumed), f"one member joined nothing: {consumed}"
        rewinds = [await _metric(s, "vitrine_outcomes_offset_rewinds_total") for _, s in members]
        # A record is read twice only after a refused write (a rebalance moved its partition): never joined twice.
        assert sum(consumed) >= total, f"{consumed} read for {total} published, rewinds {rewinds}"
        assert sum([await _metric(s, "vitrine_outcomes_duplicates_total") for _, s in members]) == 0
        assert sum([await _metric(s, "vitrine_outcomes_variant_conflicts_total") for _, s in members]) == expected.conflicts
    finally:
        for process, _ in members:
            _stop(process)
    for process, _ in members:
        assert process.returncode == 0, process.stderr.read().decode()[-2000:]
