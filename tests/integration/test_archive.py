"""The archive consumer against the real Kafka: each test has its own topics, consumer group, DLQ topic and root.

The consumer runs as `vitrine archive run` subprocesses configured through the environment, exactly as
`vitrine stack up` configures its own. The reference is what the producer was told by the broker: the
(partition, offset) of every record sent, never what the archive says about itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.integration.invariants import assert_exactly_once, eventually
from tests.integration.kafka_reads import kafka_committed, polled
from vitrine.contracts.events import Event, EventType
from vitrine.contracts.exposures import Exposure
from vitrine.export.data.archive import load
from vitrine.services.archive.store import ArchiveReader, ArchiveStore, raw_glob, visible
from vitrine.services.stack import Stack
from vitrine.services.stack.components import settings_env
from vitrine.services.stack.health import archive_ready
from vitrine.services.stack.launcher import free_port
from vitrine.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
PARTITIONS = 4
HOUR_MS = 3_600_000
Key = tuple[int, int]
"""(Kafka partition, offset): a record's identity in its topic, and so a row's in the archive."""


@dataclass
class ArchiveLane:
    """One test's private topics, group, DLQ topic and archive root on the shared stack."""

    settings: Settings
    store: ArchiveStore
    logs: Path

    @property
    def events_topic(self) -> str:
        return self.settings.archive.events_topic

    def start(self, **overrides: object) -> tuple[subprocess.Popen, Settings]:
        archive = self.settings.archive.model_copy(update={"metrics_port": free_port(), **overrides})
        settings = self.settings.model_copy(update={"archive": archive})
        log = self.logs / f"archive-{len(list(self.logs.glob('*.log')))}.log"
        with log.open("wb") as out:  # a file, not a pipe nobody reads: a chatty child would block on a full pipe
            process = subprocess.Popen([sys.executable, "-m", "vitrine", "archive", "run"], env={**os.environ, **settings_env(settings)},
                                       stdout=subprocess.DEVNULL, stderr=out)
        process.log = log  # type: ignore[attr-defined]
        return process, settings

    async def committed(self, topic: str | None = None) -> int:
        """Records committed to the archive (offsets start at 0 in a fresh topic): the sum of stored next offsets."""
        topics = [topic] if topic else [self.events_topic, self.settings.archive.exposures_topic]
        offsets = await asyncio.to_thread(self.store.next_offsets, [(t, p) for t in topics for p in range(PARTITIONS)])
        return sum(offsets.values())

    async def wait_committed(self, records: int, process: subprocess.Popen, timeout_s: float = 90) -> None:
        async def done() -> bool | None:
            if process.poll() is not None:
                raise AssertionError(f"archive exited with {process.returncode}: {process.log.read_text()[-3000:]}")
            return True if await self.committed() >= records else None

        await eventually(done, timeout_s, f"{records} records committed to the archive", interval_s=0.05)

    def rows(self) -> list[tuple[int, int, str]]:
        """(partition, offset, event_id) of every row a reader sees (the shadow rule applied)."""
        return ArchiveReader(self.store).query("SELECT kafka_partition, kafka_offset, event_id FROM events").rows

    def raw_rows(self) -> int:
        """Rows an engine that reads every committed file sees (Spark or Trino on the folder)."""
        if not list(self.store.root.glob(f"topic={self.events_topic}/date=*/hour=*/part-*.parquet")):
            return 0
        return ArchiveReader(self.store).query(f"SELECT count(*) FROM read_parquet('{raw_glob(self.store.root, self.events_topic)}')").rows[0][0]


@pytest.fixture
async def lane(stack: Stack, tmp_path: Path):
    tag = uuid.uuid4().hex[:8]
    base = stack.settings
    archive = base.archive.model_copy(update={
        "events_topic": f"events.archive-{tag}", "exposures_topic": f"recs.archive-{tag}", "dlq_topic": f"archive.dlq-{tag}",
        "group_id": f"test-archive-{tag}", "root": tmp_path / "archive", "dlq_spill_dir": tmp_path / "spill"})
    settings = base.model_copy(update={"archive": archive})
    names = [archive.events_topic, archive.exposures_topic, archive.dlq_topic]
    admin = AIOKafkaAdminClient(bootstrap_servers=base.kafka.bootstrap_servers)
    await admin.start()
    await admin.create_topics([NewTopic(name, num_partitions=PARTITIONS, replication_factor=1) for name in names])
    (tmp_path / "logs").mkdir()
    yield ArchiveLane(settings, ArchiveStore(settings.archive_root, {"events": archive.events_topic, "exposures": archive.exposures_topic}),
                      tmp_path / "logs")
    await admin.delete_topics(names)
    await admin.close()


async def _ready(process: subprocess.Popen, settings: Settings) -> None:
    async def check() -> bool | None:
        if process.poll() is not None:
            raise AssertionError(f"archive exited with {process.returncode}: {process.log.read_text()[-2000:]}")
        if await archive_ready(settings) is not None:
            return None
        return True if await _metric(settings, "vitrine_archive_assigned_partitions") == 2 * PARTITIONS else None

    await eventually(check, 30, "the archive to own its partitions", interval_s=0.1)


async def _metric(settings: Settings, name: str, labels: str = "") -> float:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"http://127.0.0.1:{settings.archive.metrics_port}/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " ") if labels in line)


async def assert_promtool_accepts_the_metrics(settings: Settings) -> None:
    """`promtool check metrics` finds nothing to say (names, units, _total suffixes, help texts)."""
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"http://127.0.0.1:{settings.archive.metrics_port}/metrics")).text
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), checked.stdout + checked.stderr


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _events(n: int, now_ms: int, seed: int, span_ms: int) -> list[Event]:
    """Events spread over `span_ms` before now, out of order: many date/hour partitions, late events among them."""
    rng = random.Random(seed)
    return [Event(event_id=f"ev-{seed}-{i}", user_id=f"user-{rng.randrange(50)}", item_id=f"item-{rng.randrange(80)}",
                  type=rng.choices(list(EventType), weights=[10, 4, 2, 1])[0], ts_ms=now_ms - rng.randrange(0, span_ms))
            for i in range(n)]


async def _send(lane: ArchiveLane, values: list[tuple[bytes, bytes]], topic: str | None = None) -> dict[Key, bytes]:
    """Send (key, value) records; returns what the broker acknowledged: (partition, offset) → value."""
    producer = AIOKafkaProducer(bootstrap_servers=lane.settings.kafka.bootstrap_servers, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic or lane.events_topic, value=value, key=key) for key, value in values]
        metadata = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return {(m.partition, m.offset): value for m, (_, value) in zip(metadata, values, strict=True)}


def _records(events: list[Event]) -> list[tuple[bytes, bytes]]:
    return [(e.user_id.encode(), e.to_json()) for e in events]


def assert_archive_holds_exactly(lane: ArchiveLane, reference: dict[Key, bytes]) -> None:
    """Every acknowledged record is one row, nothing twice, nothing else, with the event it carried; and an
    engine that reads every file (no shadow rule) sees the same number of rows."""
    rows = lane.rows()
    assert_exactly_once([(p, o) for p, o, _ in rows], reference)
    expected_ids = {key: json.loads(value)["event_id"] for key, value in reference.items()}
    assert {(p, o): event_id for p, o, event_id in rows} == expected_ids
    assert lane.raw_rows() == len(reference)


async def test_a_consumer_killed_mid_stream_and_restarted_archives_every_record_once(lane: ArchiveLane) -> None:
    """SIGKILL mid-stream, restart: every record once. Kafka's committed offsets are kept far behind on purpose
    (one commit a minute), so a restart that resumed from them instead of the archive's would duplicate rows."""
    now_ms = int(time.time() * 1000)
    events = _events(20_000, now_ms, seed=1, span_ms=3 * 86_400_000)
    resent = random.Random(2).sample(events, 300)  # a retrying producer: the same event_id in a second record
    reference = await _send(lane, _records(events + resent))
    # Compaction is off here (its own test below): its merged files linger for the retention, which an engine
    # reading every file (the raw count below) would count twice.
    no_compaction = {"compaction_min_files": 100_000}
    first, settings = lane.start(max_batch=100, flush_rows=100, flush_interval_s=30, commit_interval_s=60, **no_compaction)
    try:
        await _ready(first, settings)

        async def partway() -> bool | None:
            return True if await lane.committed() >= len(reference) // 5 else None

        await eventually(partway, 60, "a fifth of the records archived", interval_s=0.01)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    at_kill = await lane.committed()
    assert at_kill < len(reference), "the consumer finished before it could be killed; the test proved nothing"
    kafka_at_kill = await _kafka_committed(lane)
    assert kafka_at_kill < at_kill - 1000, f"Kafka's offsets ({kafka_at_kill}) are near the archive's ({at_kill}): the resume point is ambiguous"
    second, settings = lane.start(flush_rows=1000, flush_interval_s=0.5, **no_compaction)
    try:
        await lane.wait_committed(len(reference), second)
        assert_archive_holds_exactly(lane, reference)
        # Resumed exactly at the archive's offsets: the rest read once, nothing before them read again.
        assert await _metric(settings, "vitrine_archive_records_consumed_total") == len(reference) - at_kill
        # Training reads each event once: the resent records are the same events.
        table = load(lane.store.root, events_topic=lane.events_topic)
        assert_exactly_once(table.event_id.tolist(), {e.event_id for e in events})
        assert second.poll() is None
    finally:
        _stop(second)


async def _kafka_committed(lane: ArchiveLane) -> int:
    return await kafka_committed(lane.settings.kafka.bootstrap_servers, lane.settings.archive.group_id, lane.events_topic, PARTITIONS)


async def test_compaction_under_a_running_consumer_keeps_every_record_once(lane: ArchiveLane) -> None:
    """Small files of closed hours are merged while records keep arriving (late ones into hours already
    compacted); every read in between sees each record at most once, and at the end exactly once, in one
    file per hour and partition."""
    now_ms = int(time.time() * 1000)
    past = now_ms - 2 * 86_400_000  # closed hours: eligible for compaction at once (grace 0)
    process, settings = lane.start(flush_rows=40, flush_interval_s=0.2, compaction_min_files=2, compaction_grace_s=0,
                                   compaction_interval_s=0.2, compaction_retention_s=1.0)
    reference: dict[Key, bytes] = {}
    reads = 0
    sending = True

    async def read_while_compacting() -> None:
        nonlocal reads
        while sending or await _metric(settings, "vitrine_archive_compactions_total") == 0:
            keys = [(p, o) for p, o, _ in await asyncio.to_thread(lane.rows)]  # the reader re-lists when a merged part vanished
            duplicated = [k for k, n in Counter(keys).items() if n > 1]
            assert not duplicated, f"a reader saw {len(duplicated)} records twice during compaction, e.g. {duplicated[:3]}"
            reads += 1
            await asyncio.sleep(0.05)

    try:
        await _ready(process, settings)
        reader = asyncio.create_task(read_while_compacting())
        for wave in range(6):
            events = _events(600, past, seed=10 + wave, span_ms=4 * HOUR_MS)
            reference |= await _send(lane, _records(events))
            await lane.wait_committed(len(reference), process)
        sending = False
        await asyncio.wait_for(reader, 60)
        assert reads > 0

        async def compacted() -> bool | None:
            parts = await asyncio.to_thread(lane.store.parts, lane.events_topic)
            per_folder = Counter((p.folder, p.partition) for p in parts)
            return True if max(per_folder.values()) == 1 else None

        await eventually(compacted, 60, "one file per closed hour and partition", interval_s=0.2)
        assert await _metric(settings, "vitrine_archive_compactions_total") >= 4
        assert visible(lane.store.parts(lane.events_topic)) == lane.store.parts(lane.events_topic)
        assert_archive_holds_exactly(lane, reference)
        await assert_promtool_accepts_the_metrics(settings)
        assert process.poll() is None
    finally:
        sending = False
        _stop(process)


async def test_bad_records_go_to_the_dlq_with_reasons_and_only_valid_rows_are_archived(lane: ArchiveLane) -> None:
    now_ms = int(time.time() * 1000)
    good = _events(200, now_ms, seed=20, span_ms=HOUR_MS)
    bad = {
        b"this is not json": "not_json",
        json.dumps({"event_id": "x1", "user_id": "u", "type": "view", "ts_ms": now_ms}).encode(): "missing_field",
        json.dumps({"event_id": "x2", "user_id": "u", "item_id": "i", "type": "wishlist", "ts_ms": now_ms}).encode(): "unknown_type",
        json.dumps({"event_id": "x3", "user_id": "u", "item_id": "i", "type": "view", "ts_ms": now_ms // 1000}).encode(): "absurd_timestamp",
    }
    bad_exposure = json.dumps({"request_id": "r1", "user_id": "u"}).encode()
    exposure = Exposure(request_id="r2", user_id="u", ts_ms=now_ms, variant="control", model_name="gru4rec", model_version="1",
                        item_ids=["i1"], scores=[0.5], latency_ms=3.0, degraded=False)
    process, settings = lane.start(flush_interval_s=0.2)
    dlq = AIOKafkaConsumer(bootstrap_servers=lane.settings.kafka.bootstrap_servers, auto_offset_reset="earliest")
    await dlq.start()
    dlq.assign([TopicPartition(lane.settings.archive.dlq_topic, p) for p in range(PARTITIONS)])  # a private DLQ: empty before
    try:
        await _ready(process, settings)
        records = _records(good)
        for position, raw in zip(range(40, 200, 40), bad, strict=False):
            records.insert(position, (b"same-key", raw))
        sent = await _send(lane, records)
        await _send(lane, [(b"u", bad_exposure), (b"u", exposure.model_dump_json().encode())], lane.settings.archive.exposures_topic)
        await lane.wait_committed(len(records) + 2, process)
        dead: dict[bytes, str] = {}
        deadline = time.monotonic() + 30
        while len(dead) < len(bad) + 1 and time.monotonic() < deadline:
            for message in await polled(dlq, 500):
                headers = dict(message.headers)
                assert headers["detail"] and headers["source"].decode().split(":")[0] in (lane.events_topic, lane.settings.archive.exposures_topic)
                dead[message.value] = headers["reason"].decode()
        assert dead == {**bad, bad_exposure: "missing_field"}
        for reason in set(bad.values()):
            expected = list(bad.values()).count(reason) + (reason == "missing_field")
            assert await _metric(settings, "vitrine_archive_records_rejected_total", f'reason="{reason}"') == expected
        assert_archive_holds_exactly(lane, {key: value for key, value in sent.items() if value not in bad})
        exposures = ArchiveReader(lane.store).query("SELECT request_id, item_ids FROM exposures").rows
        assert exposures == [("r2", ["i1"])]
        await assert_promtool_accepts_the_metrics(settings)
        assert process.poll() is None  # bad input never kills the consumer
    finally:
        await dlq.stop()
        _stop(process)
