"""The feature consumer against the real Kafka and Redis: each test has its own topic, group and key namespace.

Consumers run as `vitrine features run` subprocesses, configured through the environment exactly as
`vitrine stack up` configures its own; waits are on stored offsets and metrics, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from tests.integration import feature_reference
from tests.integration.invariants import assert_exactly_once, eventually
from tests.integration.kafka_reads import kafka_committed, polled
from vitrine.contracts import topics
from vitrine.contracts.events import Event, EventType
from vitrine.services.events.publisher import publish
from vitrine.services.features.store import FeatureStore, user_prefix
from vitrine.services.stack import Stack
from vitrine.services.stack.components import settings_env
from vitrine.services.stack.launcher import free_port
from vitrine.services.stack.health import features_ready, redis_ready
from vitrine.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
PARTITIONS = 4


@dataclass
class Lane:
    """One test's private topic, consumer group and Redis namespace on the shared stack."""

    settings: Settings
    store: FeatureStore

    @property
    def topic(self) -> str:
        return self.settings.features.events_topic

    def consumer_settings(self, **overrides: object) -> Settings:
        features = self.settings.features.model_copy(update={"metrics_port": free_port(), **overrides})
        return self.settings.model_copy(update={"features": features})

    def start_consumer(self, **overrides: object) -> tuple[subprocess.Popen, Settings]:
        settings = self.consumer_settings(**overrides)
        env = {**os.environ, **settings_env(settings)}
        process = subprocess.Popen([sys.executable, "-m", "vitrine", "features", "run"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return process, settings

    async def processed(self) -> int:
        return sum((await self.store.stored_offsets(self.settings.features.group_id, self.topic)).values())

    async def wait_processed(self, records: int, timeout_s: float = 60) -> None:
        async def done() -> bool | None:
            return True if await self.processed() >= records else None

        await eventually(done, timeout_s, f"{records} records processed on {self.topic}", interval_s=0.05)


@pytest.fixture
async def lane(stack: Stack):
    tag = uuid.uuid4().hex[:8]
    base = stack.settings
    features = base.features.model_copy(update={"events_topic": f"events.test-{tag}", "group_id": f"test-{tag}", "namespace": f"t{tag}"})
    settings = base.model_copy(update={"features": features})
    admin = AIOKafkaAdminClient(bootstrap_servers=base.kafka.bootstrap_servers)
    await admin.start()
    await admin.create_topics([NewTopic(features.events_topic, num_partitions=PARTITIONS, replication_factor=1)])
    client = aioredis.Redis(host=base.redis.host, port=base.redis.port)
    yield Lane(settings, FeatureStore(client, features))
    await admin.delete_topics([features.events_topic])
    await admin.close()
    async for key in client.scan_iter(match=f"{features.namespace}:*", count=1000):
        await client.delete(key)
    await client.aclose()


async def _ready(process: subprocess.Popen, settings: Settings, partitions: int | None = None) -> None:
    async def check() -> bool | None:
        if process.poll() is not None:
            raise AssertionError(f"consumer exited with {process.returncode}: {process.stderr.read().decode()[-2000:]}")
        if await features_ready(settings) is not None:
            return None
        return True if partitions is None or await _metric(settings, "vitrine_features_assigned_partitions") == partitions else None

    await eventually(check, 30, "the consumer to own its partitions", interval_s=0.1)


async def _metric(settings: Settings, name: str, labels: str = "") -> float:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"http://127.0.0.1:{settings.features.metrics_port}/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name) and labels in line and not line.startswith("#"))


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def _events(n: int, now_ms: int, users: int = 40, items: int = 60, seed: int = 1, span_ms: int = 2 * 86_400_000) -> list[Event]:
    """Events spread over `span_ms` before now (two days), out of order on purpose, for a handful of users."""
    rng = random.Random(seed)
    kinds = list(EventType)
    return [
        Event(event_id=f"ev-{seed}-{i}", user_id=f"user-{rng.randrange(users)}", item_id=f"item-{rng.randrange(items)}",
              type=rng.choices(kinds, weights=[10, 4, 2, 1])[0], ts_ms=now_ms - rng.randrange(0, span_ms))
        for i in range(n)
    ]


async def _assert_matches_reference(lane: Lane, events: list[Event], now_ms: int) -> None:
    expected = feature_reference.compute(events, lane.settings.features, now_ms)
    users = sorted(expected.users)
    actual = await lane.store.many_user_features(users, now_ms)
    for got in actual:
        want = expected.users[got.user_id]
        assert got.recent == want.recent, got.user_id
        assert got.window_counts == want.window_counts, got.user_id
        assert got.purchased == want.purchased, got.user_id
    popular = dict(await lane.store.popular(10_000))
    assert popular == pytest.approx(expected.popular)
    trending = dict(await lane.store.trending(10_000, now_ms))
    assert trending.keys() == expected.trending.keys()
    assert trending == pytest.approx(expected.trending, rel=1e-9)
    # A top-n read is cut inside Redis: the n best in order, and its scratch key gone.
    top = await lane.store.trending(5, now_ms)
    assert [item for item, _ in top] == sorted(expected.trending, key=lambda i: (-expected.trending[i], i))[:5]
    assert not [key async for key in lane.store.client.scan_iter(match=f"{lane.store.ns}:trending:merged:*")]
    assert await _successor_tables(lane) == expected.successors


async def _successor_tables(lane: Lane) -> dict[str, dict[str, float]]:
    """Every item → next-item table the namespace holds (read through the store, as the gateway reads)."""
    prefix = lane.store.successors_key("")
    items = [key.decode().removeprefix(prefix) async for key in lane.store.client.scan_iter(match=f"{prefix}*")]
    return {item: dict(await lane.store.successors(item, 10_000)) for item in items}


async def _publish(lane: Lane, events: list[Event]) -> None:
    report = await publish(events, lane.settings.kafka.bootstrap_servers, lane.topic, retime=False)
    assert report.sent == len(events)


async def test_features_equal_a_plain_python_reference(lane: Lane) -> None:
    now_ms = int(time.time() * 1000)
    events = _events(3000, now_ms)
    process, settings = lane.start_consumer()
    try:
        await _ready(process, settings)
        await _publish(lane, events)
        await lane.wait_processed(len(events))
        await _assert_matches_reference(lane, events, now_ms)
        assert await _metric(settings, "vitrine_features_events_applied_total") == len(events)
        assert await _metric(settings, "vitrine_features_freshness_seconds_count") == len(events)
    finally:
        _stop(process)
    assert process.returncode == 0, process.stderr.read().decode()[-2000:]


async def test_the_same_events_sent_twice_change_nothing(lane: Lane) -> None:
    now_ms = int(time.time() * 1000)
    # Within the dedupe window (24 h of event time behind each user's newest event): see docs/redis-layout.md.
    events = _events(1500, now_ms, seed=2, span_ms=20 * 3_600_000)
    process, settings = lane.start_consumer()
    try:
        await _ready(process, settings)
        await _publish(lane, events)
        await lane.wait_processed(len(events))
        before = await lane.store.many_user_features(sorted({e.user_id for e in events}), now_ms)
        popular_before = await lane.store.popular(10_000)
        successors_before = await _successor_tables(lane)
        assert successors_before  # the events hold steps from one item to another
        await _publish(lane, list(reversed(events)))  # a producer retry, or a replay
        await lane.wait_processed(2 * len(events))
        assert await lane.store.many_user_features(sorted({e.user_id for e in events}), now_ms) == before
        assert await lane.store.popular(10_000) == popular_before
        assert await _successor_tables(lane) == successors_before
        assert await _metric(settings, "vitrine_features_events_deduplicated_total") == len(events)
        await _assert_matches_reference(lane, events, now_ms)
    finally:
        _stop(process)


async def test_bad_events_go_to_the_dlq_with_reasons_and_the_good_ones_around_them_apply(lane: Lane) -> None:
    now_ms = int(time.time() * 1000)
    good = _events(300, now_ms, seed=3)
    bad = {
        b"this is not json": "not_json",
        json.dumps({"event_id": "x1", "user_id": "u", "type": "view", "ts_ms": now_ms}).encode(): "missing_field",
        json.dumps({"event_id": "x2", "user_id": "u", "item_id": "i", "type": "wishlist", "ts_ms": now_ms}).encode(): "unknown_type",
        json.dumps({"event_id": "x3", "user_id": "u", "item_id": "i", "type": "view", "ts_ms": now_ms // 1000}).encode(): "absurd_timestamp",
        json.dumps({"event_id": "x4", "user_id": "u", "item_id": "i", "type": "view", "ts_ms": now_ms + 5 * 86_400_000}).encode(): "absurd_timestamp",
    }
    process, settings = lane.start_consumer()
    dlq = AIOKafkaConsumer(bootstrap_servers=lane.settings.kafka.bootstrap_servers)
    await dlq.start()
    dlq_partitions = [TopicPartition(topics.EVENTS_DLQ, p) for p in range(lane.settings.kafka.partitions)]  # as `stack up` made it
    dlq.assign(dlq_partitions)
    await dlq.seek_to_end(*dlq_partitions)  # the end pinned before anything is rejected: no settling by a timed poll
    for tp in dlq_partitions:
        await dlq.position(tp)
    producer = AIOKafkaProducer(bootstrap_servers=lane.settings.kafka.bootstrap_servers)
    await producer.start()
    try:
        await _ready(process, settings)
        records = [e.to_json() for e in good]
        for position, raw in zip(range(50, 300, 50), bad, strict=False):
            records.insert(position, raw)
        for value in records:
            await producer.send(lane.topic, value=value, key=b"same-key")  # one partition: bad ones sit between good ones
        await producer.flush()
        await lane.wait_processed(len(records))
        await _assert_matches_reference(lane, good, now_ms)
        dead: dict[bytes, str] = {}
        deadline = time.monotonic() + 30
        while len(dead) < len(bad) and time.monotonic() < deadline:
            for message in await polled(dlq, 500):
                headers = dict(message.headers)
                if headers["source"].decode().startswith(lane.topic + ":"):
                    dead[message.value] = headers["reason"].decode()
                    assert headers["detail"]
        assert dead == bad
        for reason in set(bad.values()):
            assert await _metric(settings, "vitrine_features_events_rejected_total", f'reason="{reason}"') == list(bad.values()).count(reason)
        assert process.poll() is None  # bad input never kills the consumer
    finally:
        await producer.stop()
        await dlq.stop()
        _stop(process)


async def _applied_in_redis(lane: Lane, users: list[str]) -> tuple[list[str], dict[str, int]]:
    """What Redis says was applied: every user's remembered event ids (the `seen` dedupe sets), and per user
    how many applications the largest window counted (one per applied event, a repeat would count twice).

    Exact only while no user's events span more than the dedupe window and the largest window's previous
    bucket (nothing pruned): the tests that use it keep their events within 20 hours."""
    window = lane.settings.features.windows_s[-1]
    ids: list[str] = []
    counts: dict[str, int] = {}
    for user in users:
        prefix = user_prefix(lane.store.ns, user)
        ids += [member.decode() for member in await lane.store.client.zrange(f"{prefix}:seen", 0, -1)]
        fields = await lane.store.client.hgetall(f"{prefix}:windows")
        counts[user] = sum(int(n) for name, n in fields.items() if name.decode().startswith(f"{window}:"))
    return ids, counts


async def _assert_applied_exactly_once(lane: Lane, events: list[Event]) -> None:
    users = sorted({e.user_id for e in events})
    ids, counts = await _applied_in_redis(lane, users)
    assert_exactly_once(ids, {e.event_id for e in events})
    assert counts == {user: sum(e.user_id == user for e in events) for user in users}


async def _kafka_committed(lane: Lane) -> int:
    return await kafka_committed(lane.settings.kafka.bootstrap_servers, lane.settings.features.group_id, lane.topic, PARTITIONS)


async def test_a_consumer_killed_mid_stream_and_restarted_ends_equal_to_the_reference(lane: Lane) -> None:
    """SIGKILL mid-stream, restart: every event applied exactly once, and the restart resumed from Redis's
    offsets. Kafka's committed offsets are kept far behind on purpose (one commit a minute), so a resume from
    them would re-read thousands of records (and count them as duplicates): the test tells the two apart."""
    now_ms = int(time.time() * 1000)
    events = _events(20_000, now_ms, users=200, items=300, seed=4, span_ms=20 * 3_600_000)
    await _publish(lane, events)
    first, settings = lane.start_consumer(max_batch=100, commit_interval_s=60)
    try:
        await _ready(first, settings)

        async def partway() -> bool | None:
            return True if await lane.processed() >= len(events) // 5 else None

        await eventually(partway, 60, "a fifth of the events", interval_s=0.01)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        at_kill = await lane.processed()
        assert at_kill < len(events), "the consumer finished before it could be killed; the test proved nothing"
    finally:
        if first.poll() is None:
            first.kill()
    kafka_at_kill = await _kafka_committed(lane)
    assert kafka_at_kill < at_kill - 1000, f"Kafka's offsets ({kafka_at_kill}) are near Redis's ({at_kill}): the resume point is ambiguous"
    second, settings = lane.start_consumer()
    try:
        await lane.wait_processed(len(events))
        await _assert_matches_reference(lane, events, now_ms)
        await _assert_applied_exactly_once(lane, events)
        # Resumed exactly at Redis's offsets: the rest read once, nothing before them read again.
        assert await _metric(settings, "vitrine_features_events_consumed_total") == len(events) - at_kill
        assert await _metric(settings, "vitrine_features_events_deduplicated_total") == 0
    finally:
        _stop(second)


async def test_two_consumers_in_one_group_share_the_partitions(lane: Lane) -> None:
    now_ms = int(time.time() * 1000)
    events = _events(6000, now_ms, users=100, seed=5, span_ms=20 * 3_600_000)
    a, settings_a = lane.start_consumer()
    b, settings_b = lane.start_consumer()
    try:
        await _ready(a, settings_a)
        await _ready(b, settings_b)

        async def balanced() -> bool | None:
            counts = [await _metric(s, "vitrine_features_assigned_partitions") for s in (settings_a, settings_b)]
            return True if counts == [PARTITIONS / 2, PARTITIONS / 2] else None

        await eventually(balanced, 30, "two partitions each", interval_s=0.1)
        await _publish(lane, events)
        await lane.wait_processed(len(events))
        await _assert_matches_reference(lane, events, now_ms)
        applied = [await _metric(s, "vitrine_features_events_applied_total") for s in (settings_a, settings_b)]
        assert all(n > 0 for n in applied) and sum(applied) == len(events)
        await _assert_applied_exactly_once(lane, events)
    finally:
        _stop(a)
        _stop(b)


async def _restart_redis_from(stack: Stack, snapshot: Path) -> None:
    """Stop the stack's Redis, put an older copy of its AOF in place and start it again: what Redis does
    after a machine crash with `appendfsync everysec` (the last second of writes is gone)."""
    aof = stack.settings.stack.home / "redis" / "appendonlydir"
    await asyncio.to_thread(stack.supervisor.rpc_stop, "redis")
    shutil.rmtree(aof)
    shutil.copytree(snapshot, aof)
    await _start_redis(stack)


async def _start_redis(stack: Stack) -> None:
    """Only Redis, through the stack's supervisor, ready when it answers PING (not `stack.up()`: the other
    components are not this test's business)."""
    await asyncio.to_thread(stack.supervisor.start, "redis")

    async def answers() -> bool | None:
        return True if await redis_ready(stack.settings) is None else None

    await eventually(answers, 30, "Redis to answer again")


@pytest.mark.parametrize("noticed_by", ["the next batch", "the idle check"])
async def test_a_redis_rollback_under_a_running_consumer_is_replayed_not_skipped(
    lane: Lane, stack: Stack, tmp_path: Path, noticed_by: str,
) -> None:
    """Redis restarts from an older AOF while the consumer runs: the events it lost are read again.

    "the next batch": the idle check is off, so the apply script must notice (its atomic offset check);
    "the idle check": no event follows the rollback, so only the periodic comparison can notice.
    """
    now_ms = int(time.time() * 1000)
    before, lost, after = (_events(800, now_ms, seed=seed) for seed in (6, 7, 8))
    if noticed_by == "the idle check":
        after = []
    process, settings = lane.start_consumer(offset_check_interval_s=3600 if after else 0.2)
    try:
        await _ready(process, settings, PARTITIONS)
        await _publish(lane, before)
        await lane.wait_processed(len(before))
        # Redis writes its AOF before it answers, so the consumer being idle means the files hold `before`.
        snapshot = shutil.copytree(stack.settings.stack.home / "redis" / "appendonlydir", tmp_path / "aof")
        await _publish(lane, lost)
        await lane.wait_processed(len(before) + len(lost))
        await _restart_redis_from(stack, snapshot)
        await lane.store.client.connection_pool.disconnect()  # the test's own connections died with Redis
        if after:
            assert await lane.processed() == len(before), "Redis did not come back with the older state; the test proves nothing"
            await _publish(lane, after)
        await lane.wait_processed(len(before) + len(lost) + len(after))
        await _assert_matches_reference(lane, before + lost + after, now_ms)
        assert await _metric(settings, "vitrine_features_offset_rewinds_total") >= 1
    finally:
        _stop(process)


MESSAGE_LIMIT = 4096
"""max.message.bytes of both topics in the DLQ test: a record just under it fits the input topic, not the DLQ once
the consumer adds its headers."""


async def _read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 20) -> list:
    """Every record of `topic` from the beginning, once `expected` have arrived."""
    reader = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await reader.start()
    messages: list = []
    try:
        async def arrived() -> bool | None:
            messages.extend(await polled(reader, 200))
            return True if len(messages) >= expected else None

        await eventually(arrived, timeout_s, f"{expected} records on {topic}", interval_s=0)
    finally:
        await reader.stop()
    return messages


async def test_a_record_the_dlq_will_not_take_is_spilled_logged_counted_and_skipped(lane: Lane, tmp_path: Path) -> None:
    """Before bounded retries, a permanent DLQ error was retried forever under the batch lock: the consumer stopped."""
    bootstrap = lane.settings.kafka.bootstrap_servers
    dlq_topic = f"{lane.topic}.dlq"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    limit = {"max.message.bytes": str(MESSAGE_LIMIT)}
    await admin.create_topics([NewTopic(dlq_topic, num_partitions=1, replication_factor=1, topic_configs=limit)])
    await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, lane.topic, limit)])
    now_ms = int(time.time() * 1000)
    good = _events(200, now_ms, seed=9)
    too_big, small_bad = b"<" * (MESSAGE_LIMIT - 100), b"not json either"
    spill_dir = tmp_path / "spill"
    process, settings = lane.start_consumer(dlq_topic=dlq_topic, dlq_spill_dir=spill_dir, dlq_send_attempts=3)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await _ready(process, settings)
        values = [e.to_json() for e in good]
        values[100:100] = [too_big, small_bad]
        offsets = {}
        for value in values:  # one key: one partition, the bad records between good ones
            offsets[value] = await (await producer.send(lane.topic, value=value, key=b"k"))
        await lane.wait_processed(len(values), timeout_s=30)
        await _assert_matches_reference(lane, good, now_ms)
        [dead] = await _read_all(bootstrap, dlq_topic, 1)
        assert dead.value == small_bad and dict(dead.headers)["reason"] == b"not_json"
        [line] = (spill_dir / f"{settings.features.group_id}.jsonl").read_text().splitlines()
        spilled = json.loads(line)
        where = offsets[too_big]
        assert (spilled["topic"], spilled["partition"], spilled["offset"]) == (where.topic, where.partition, where.offset)
        assert base64.b64decode(spilled["value"]) == too_big
        headers = {name: base64.b64decode(value) for name, value in spilled["headers"]}
        assert headers["reason"] == b"not_json" and headers["source"] == f"{where.topic}:{where.partition}:{where.offset}".encode()
        assert "MessageSizeTooLarge" in spilled["error"]
        assert await _metric(settings, "vitrine_features_dlq_spilled_total", 'reason="not_json"') == 1
        assert await _metric(settings, "vitrine_features_events_rejected_total", 'reason="not_json"') == 2
    finally:
        await producer.stop()
        _stop(process)
        await admin.delete_topics([dlq_topic])
        await admin.close()
    assert f"{where.topic}:{where.partition}:{where.offset}" in process.stderr.read().decode()


async def _publish_placed(lane: Lane, events: list[Event]) -> dict[str, tuple[int, int]]:
    """Publish keyed by user (as the shop does) and return where each event landed: event_id → (partition, offset)."""
    producer = AIOKafkaProducer(bootstrap_servers=lane.settings.kafka.bootstrap_servers, acks="all")
    await producer.start()
    try:
        sends = [await producer.send(lane.topic, value=e.to_json(), key=e.user_id.encode()) for e in events]
        placed = await asyncio.gather(*sends)
    finally:
        await producer.stop()
    return {e.event_id: (meta.partition, meta.offset) for e, meta in zip(events, placed, strict=True)}


async def _commit_in_kafka(lane: Lane, offsets: dict[int, int]) -> None:
    """Kafka's committed offsets for the lane's group, set by hand (a member that committed and left)."""
    committer = AIOKafkaConsumer(bootstrap_servers=lane.settings.kafka.bootstrap_servers, group_id=lane.settings.features.group_id,
                                 enable_auto_commit=False)
    await committer.start()
    try:
        partitions = [TopicPartition(lane.topic, p) for p in offsets]
        committer.assign(partitions)
        await committer.commit({tp: offsets[tp.partition] for tp in partitions})
    finally:
        await committer.stop()


@pytest.mark.parametrize("kafka_is", ["ahead of Redis", "behind Redis"])
async def test_redis_offsets_win_when_kafkas_committed_offsets_disagree(lane: Lane, kafka_is: str) -> None:
    """Redis's stored offsets are the truth: the consumer resumes there whether Kafka's commit is ahead
    (resuming from Kafka would skip events) or behind (it would re-read, and only dedupe would hide it)."""
    now_ms = int(time.time() * 1000)
    events = _events(2000, now_ms, users=80, seed=10, span_ms=20 * 3_600_000)
    placed = await _publish_placed(lane, events)
    ends = {p: 1 + max(o for q, o in placed.values() if q == p) for p in range(PARTITIONS)}
    redis_at = {p: end // 2 for p, end in ends.items()}
    kafka_at = ends if kafka_is == "ahead of Redis" else {p: end // 4 for p, end in ends.items()}
    await lane.store.apply([], lane.settings.features.group_id, {(lane.topic, p): o for p, o in redis_at.items()})
    await _commit_in_kafka(lane, kafka_at)
    remaining = [e for e in events if placed[e.event_id][1] >= redis_at[placed[e.event_id][0]]]
    process, settings = lane.start_consumer()
    try:
        await lane.wait_processed(len(events))
        await _assert_matches_reference(lane, remaining, now_ms)
        await _assert_applied_exactly_once(lane, remaining)
        assert await _metric(settings, "vitrine_features_events_consumed_total") == len(remaining)
    finally:
        _stop(process)


async def test_a_redis_outage_pauses_the_consumer_with_counted_retries_and_skips_nothing(lane: Lane, stack: Stack) -> None:
    now_ms = int(time.time() * 1000)
    events = _events(1500, now_ms, seed=11, span_ms=20 * 3_600_000)
    process, settings = lane.start_consumer(redis_retry_max_s=0.5)
    try:
        await _ready(process, settings, PARTITIONS)
        await asyncio.to_thread(stack.supervisor.rpc_stop, "redis")
        try:
            await _publish(lane, events)

            async def retrying() -> bool | None:
                return True if await _metric(settings, "vitrine_features_write_retries_total") >= 3 else None

            await eventually(retrying, 30, "the consumer to retry its Redis write")
            assert process.poll() is None, "a Redis outage must pause the consumer, not end it"
        finally:
            await _start_redis(stack)
        await lane.store.client.connection_pool.disconnect()
        await lane.wait_processed(len(events))
        await _assert_matches_reference(lane, events, now_ms)
        await _assert_applied_exactly_once(lane, events)
        assert await _metric(settings, "vitrine_features_events_consumed_total") == len(events)  # no batch was dropped or re-read
        assert await _metric(settings, "vitrine_features_events_applied_total") == len(events)
    finally:
        _stop(process)


async def test_dlq_sends_are_retried_then_spilled_when_the_dlq_is_unavailable(lane: Lane, tmp_path: Path) -> None:
    """A DLQ that does not answer (here: a topic that does not exist, which aiokafka reports as retriable)
    is tried `dlq_send_attempts` times, each retry counted, then the record is spilled and the stream goes on."""
    now_ms = int(time.time() * 1000)
    good = _events(100, now_ms, seed=12)
    attempts = 3
    process, settings = lane.start_consumer(dlq_topic=f"{lane.topic}.missing-dlq", dlq_send_attempts=attempts,
                                            dlq_send_timeout_ms=500, dlq_spill_dir=tmp_path)
    try:
        await _ready(process, settings)
        values = [e.to_json() for e in good]
        values.insert(50, b"{broken")
        producer = AIOKafkaProducer(bootstrap_servers=lane.settings.kafka.bootstrap_servers)
        await producer.start()
        try:
            for value in values:
                await producer.send(lane.topic, value=value, key=b"k")
        finally:
            await producer.stop()
        await lane.wait_processed(len(values), timeout_s=30)
        await _assert_matches_reference(lane, good, now_ms)
        assert await _metric(settings, "vitrine_features_write_retries_total") == attempts - 1
        assert await _metric(settings, "vitrine_features_dlq_spilled_total", 'reason="not_json"') == 1
        [line] = (tmp_path / f"{settings.features.group_id}.jsonl").read_text().splitlines()
        assert base64.b64decode(json.loads(line)["value"]) == b"{broken"
    finally:
        _stop(process)
