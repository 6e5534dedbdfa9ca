"""`vitrine features run`: an aiokafka consumer group member that keeps the feature store current.

Per batch (at most `max_batch` records from `getmany`):
1. every record is validated against the event schema; rejects go to `events.dlq` with the reason
   and their origin (awaited: a record is never dropped silently). A send is tried
   `dlq_send_attempts` times (once for errors the broker calls permanent, such as a record too large
   for the DLQ); a record the DLQ will not take is appended to a local spill file (JSON lines,
   fsync'd) and logged with its coordinates before it is skipped, so a DLQ problem can neither wedge
   the consumer (and with it the group's rebalances) nor lose a record;
2. the valid events and the partitions' next offsets are written to Redis in one atomic script;
   duplicates (by event_id, within the dedupe window) change nothing. If Redis's stored offset for a
   partition is behind what this consumer last stored (Redis rolled back, e.g. lost its last second
   of AOF), the script writes nothing and the consumer seeks back to the stored offsets and re-reads;
   while idle, the stored offsets are compared every `offset_check_interval_s` for the same reason;
3. every `commit_interval_s` (and before a rebalance or exit) the offsets are committed to Kafka as
   well, a hint for lag tooling: on assignment the consumer seeks to the offsets stored in Redis,
   which always match the features.

A rebalance waits for the batch in flight and commits before partitions are revoked. SIGTERM ends the
loop after the current batch, commits and closes. Redis or Kafka being down pauses the consumer
(retrying with back-off) instead of losing or skipping events.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import BrokerResponseError
from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from vitrine.contracts.events import Event, EventRejected, parse_event
from vitrine.services.features.metrics import FeatureMetrics
from vitrine.services.features.store import FeatureStore, WriteResult
from vitrine.services.heap import freeze_startup_objects
from vitrine.settings import Settings

log = logging.getLogger(__name__)
DLQ_DETAIL_MAX = 1000
RETRYABLE = (aioredis.ConnectionError, aioredis.TimeoutError, ConnectionError, OSError)
RETRY_BACKOFF_S = 0.05
"""First back-off step (doubling up to the configured ceiling) for Redis writes and DLQ sends."""
Rejects = Sequence[tuple[ConsumerRecord, EventRejected]]


@dataclass(frozen=True, eq=False)
class _DlqFailure:
    """A reject the DLQ did not take on the last try."""

    record: ConsumerRecord
    rejected: EventRejected
    error: Exception
    alone: bool
    """Whether that try was the record in a Kafka batch of its own."""

    def worth_retrying(self, tries: int, max_tries: int) -> bool:
        if _permanent(self.error):
            return not self.alone  # a batch-mate's size error is not this record's: one try alone
        return tries < max_tries


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, owner: FeatureConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Wait for the batch in flight, then commit what it stored: the next owner starts right after it.
        async with self.owner.batch_lock:
            await self.owner.commit_processed(revoked)
            self.owner.forget(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.owner.seek_to_stored_offsets(assigned)


class FeatureConsumer:
    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.cfg = settings.features
        self.registry = registry or CollectorRegistry()
        self.metrics = FeatureMetrics(self.registry)
        self.redis = aioredis.Redis(host=settings.redis.host, port=settings.redis.port, socket_timeout=5, socket_connect_timeout=5)
        self.store = FeatureStore(self.redis, self.cfg)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka.bootstrap_servers,
            group_id=self.cfg.group_id,
            client_id=f"{self.cfg.group_id}-consumer",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.cfg.max_batch,
            fetch_max_wait_ms=self.cfg.poll_timeout_ms,
        )
        self.producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka.bootstrap_servers, acks="all", enable_idempotence=True,
            client_id=f"{self.cfg.group_id}-dlq", request_timeout_ms=self.cfg.dlq_send_timeout_ms,
        )
        self.batch_lock = asyncio.Lock()
        self.processed: dict[TopicPartition, int] = {}
        """Next offset per owned partition as stored in Redis by (or sought to from) this consumer."""
        self.lag_labels: set[tuple[str, str]] = set()
        self.last_commit = 0.0
        self.last_offset_check = time.monotonic()

    @property
    def spill_path(self) -> Path:
        return self.cfg.dlq_spill_dir / f"{self.cfg.group_id}.jsonl"

    # --- lifecycle ------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        await self.producer.start()
        self.consumer.subscribe([self.cfg.events_topic], listener=_Rebalance(self))
        await self.consumer.start()
        freeze_startup_objects()
        log.info("consuming %s as group %s", self.cfg.events_topic, self.cfg.group_id)
        try:
            while not stop.is_set():
                batch = await self.consumer.getmany(timeout_ms=self.cfg.poll_timeout_ms, max_records=self.cfg.max_batch)
                if batch:
                    async with self.batch_lock:
                        await self.process(batch)
                elif time.monotonic() - self.last_offset_check >= self.cfg.offset_check_interval_s:
                    async with self.batch_lock:
                        await self.rewind_if_redis_behind()
                self._update_gauges()
        finally:
            async with self.batch_lock:
                await self.commit_processed(self.consumer.assignment())
            await self.consumer.stop()
            await self.producer.stop()
            await self.redis.aclose()
            log.info("stopped after committing %d partitions", len(self.processed))

    async def seek_to_stored_offsets(self, assigned: set[TopicPartition]) -> None:
        stored = await self._with_redis_retry(lambda: self.store.stored_offsets(self.cfg.group_id, self.cfg.events_topic))
        for tp in assigned:
            if tp.partition in stored:
                self.consumer.seek(tp, stored[tp.partition])
                self.processed[tp] = stored[tp.partition]

    async def rewind_if_redis_behind(self) -> None:
        """Idle check: Redis may have rolled back while no batch arrived to notice (see `process`)."""
        self.last_offset_check = time.monotonic()
        stored = await self._with_redis_retry(lambda: self.store.stored_offsets(self.cfg.group_id, self.cfg.events_topic))
        behind = {
            (tp.topic, tp.partition): stored.get(tp.partition, -1)
            for tp in self.consumer.assignment()
            if tp in self.processed and stored.get(tp.partition, -1) < self.processed[tp]
        }
        if behind:
            await self._rewind(behind, {})

    async def _rewind(self, behind: dict[tuple[str, int], int], batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """Seek back after a refused write: a partition where Redis is behind goes to its stored offset (the
        beginning if Redis has none), the batch's other partitions to their first unapplied record."""
        for tp, records in batch.items():
            if (tp.topic, tp.partition) not in behind:
                self.consumer.seek(tp, records[0].offset)
        for (topic, partition), stored in behind.items():
            tp = TopicPartition(topic, partition)
            log.warning("Redis holds offset %d for %s:%d, behind this consumer's %s (Redis lost writes): re-reading",
                        stored, topic, partition, self.processed.get(tp))
            self.metrics.offset_rewinds.inc()
            if stored >= 0:
                self.consumer.seek(tp, stored)
                self.processed[tp] = stored
            else:
                await self.consumer.seek_to_beginning(tp)
                self.processed.pop(tp, None)

    async def commit_processed(self, partitions: set[TopicPartition]) -> None:
        offsets = {tp: self.processed[tp] for tp in partitions if tp in self.processed}
        self.last_commit = time.monotonic()
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except Exception as exc:  # noqa: BLE001 - Kafka's commit is a hint; Redis holds the truth
            committed = ", ".join(f"{tp.topic}:{tp.partition}={offset}" for tp, offset in sorted(offsets.items()))
            log.warning("commit of %s to Kafka failed (%s); the offsets are safe in Redis", committed, exc)

    # --- one batch ------------------------------------------------------------------------------
    async def process(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        started = time.perf_counter()
        now_ms = int(time.time() * 1000)
        events: list[Event] = []
        rejects: list[tuple[ConsumerRecord, EventRejected]] = []
        for tp, records in batch.items():
            self.metrics.consumed.labels(tp.topic).inc(len(records))
            for record in records:
                try:
                    if record.value is None:
                        raise EventRejected("not_json", "empty record value")
                    events.append(parse_event(record.value, now_ms=now_ms))
                except EventRejected as rejected:
                    rejects.append((record, rejected))
        if rejects:
            await self._dead_letter(rejects)
        next_offsets = {(tp.topic, tp.partition): records[-1].offset + 1 for tp, records in batch.items()}
        expected = {(tp.topic, tp.partition): self.processed.get(tp, -1) for tp in batch}
        result = await self._with_redis_retry(lambda: self.store.apply(events, self.cfg.group_id, next_offsets, expected))
        if result.refused:
            await self._rewind(result.behind, batch)
            return
        self._count_applied(events, result)
        for tp, records in batch.items():
            self.processed[tp] = records[-1].offset + 1
        if time.monotonic() - self.last_commit >= self.cfg.commit_interval_s:
            await self.commit_processed(self.consumer.assignment())
        self.metrics.batch_size.observe(sum(len(r) for r in batch.values()))
        self.metrics.batch_duration.observe(time.perf_counter() - started)

    def _count_applied(self, events: Sequence[Event], result: WriteResult) -> None:
        visible_s = time.time()
        for event, applied in zip(events, result.applied, strict=True):
            if applied:
                self.metrics.applied.labels(event.type.value).inc()
                self.metrics.freshness.observe(max(0.0, visible_s - event.ts_ms / 1000))
            else:
                self.metrics.deduplicated.labels(event.type.value).inc()

    # --- the DLQ --------------------------------------------------------------------------------
    async def _dead_letter(self, rejects: Rejects) -> None:
        """Send rejects to the DLQ with bounded retries; spill what it will not take, then count them all.

        Bounded because the batch lock is held: endless retries would wedge this consumer and every
        rebalance of its group. The first try sends everything together; retries send each record alone,
        because the broker refuses a whole Kafka batch when one record in it is too large, and aiokafka
        does not split it: an innocent batch-mate gets its own batch. A permanent error on a record sent
        alone is final at once; other errors are retried up to `dlq_send_attempts` tries.
        """
        failed = await self._send_together(rejects)
        attempt = 1
        while retry := [f for f in failed if f.worth_retrying(attempt, self.cfg.dlq_send_attempts)]:
            self.metrics.write_retries.inc()
            log.warning("retrying %d DLQ sends after %s: %s (try %d)", len(retry), type(retry[0].error).__name__, retry[0].error, attempt + 1)
            if any(not _permanent(f.error) for f in retry):
                await asyncio.sleep(min(RETRY_BACKOFF_S * 2 ** (attempt - 1), self.cfg.redis_retry_max_s))
            failed = [f for f in failed if f not in retry] + await self._send_alone(retry)
            attempt += 1
        if failed:
            await asyncio.to_thread(self._spill, failed)
        for _, rejected in rejects:
            self.metrics.rejected.labels(rejected.reason).inc()

    @staticmethod
    def _dlq_headers(record: ConsumerRecord, rejected: EventRejected) -> list[tuple[str, bytes]]:
        return [
            ("reason", rejected.reason.encode()),
            ("detail", rejected.detail[:DLQ_DETAIL_MAX].encode()),
            ("source", f"{record.topic}:{record.partition}:{record.offset}".encode()),
        ]

    async def _send(self, record: ConsumerRecord, rejected: EventRejected) -> asyncio.Future:
        return await self.producer.send(
            self.cfg.dlq_topic, value=record.value or b"", key=record.key, headers=self._dlq_headers(record, rejected))

    async def _send_together(self, rejects: Rejects) -> list[_DlqFailure]:
        """One try per reject, all in flight together; returns the ones that failed, with their error."""
        failed: list[_DlqFailure] = []
        in_flight = []
        for record, rejected in rejects:
            try:
                in_flight.append((record, rejected, await self._send(record, rejected)))
            except Exception as exc:  # noqa: BLE001 - any failure is retried or spilled, never dropped
                failed.append(_DlqFailure(record, rejected, exc, alone=False))
        outcomes = await asyncio.gather(*(future for _, _, future in in_flight), return_exceptions=True)
        for (record, rejected, _), outcome in zip(in_flight, outcomes, strict=True):
            if isinstance(outcome, Exception):
                failed.append(_DlqFailure(record, rejected, outcome, alone=False))
        return failed

    async def _send_alone(self, retry: Sequence[_DlqFailure]) -> list[_DlqFailure]:
        """One try per record, each delivered (or failed) before the next is sent: one record per Kafka batch."""
        failed = []
        for f in retry:
            try:
                await (await self._send(f.record, f.rejected))
            except Exception as exc:  # noqa: BLE001 - any failure is retried or spilled, never dropped
                failed.append(_DlqFailure(f.record, f.rejected, exc, alone=True))
        return failed

    def _spill(self, failed: Sequence[_DlqFailure]) -> None:
        """Append the records to the spill file and fsync it before the batch may skip them.

        A failure here propagates: the batch is not stored, the process ends and is restarted, and the
        records are read again. Each line holds what a replay into the DLQ needs.
        """
        path = self.spill_path
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        lines = [_spill_line(f.record, f.rejected, f.error, self.cfg.dlq_topic, self._dlq_headers(f.record, f.rejected))
                 for f in failed]
        with path.open("ab") as spill:
            spill.write("".join(lines).encode())
            spill.flush()
            os.fsync(spill.fileno())
        if created:
            _fsync_dir(path.parent)
        for f in failed:
            self.metrics.dlq_spilled.labels(f.rejected.reason).inc()
            log.error("DLQ refused %s:%d:%d (%s: %s); spilled to %s and skipped",
                      f.record.topic, f.record.partition, f.record.offset, type(f.error).__name__, f.error, path)

    # --- helpers --------------------------------------------------------------------------------
    def _retrying(self, *kinds: type[BaseException]) -> AsyncRetrying:
        """Redis writes: retried for as long as Redis is unreachable (pausing is safe; skipping is not)."""
        def count(state) -> None:  # noqa: ANN001 - tenacity's RetryCallState
            self.metrics.write_retries.inc()
            log.warning("retrying after %s (attempt %d)", state.outcome.exception(), state.attempt_number)

        return AsyncRetrying(
            retry=retry_if_exception_type(kinds or RETRYABLE),
            wait=wait_exponential(multiplier=RETRY_BACKOFF_S, max=self.cfg.redis_retry_max_s),
            before_sleep=count,
            reraise=True,
        )

    async def _with_redis_retry(self, call):  # noqa: ANN001, ANN202
        async for attempt in self._retrying(*RETRYABLE):
            with attempt:
                return await call()
        raise AssertionError("unreachable")

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Partitions this member no longer owns: no commits, no lag series for them."""
        for tp in partitions:
            self.processed.pop(tp, None)
            labels = (tp.topic, str(tp.partition))
            if labels in self.lag_labels:
                self.metrics.lag.remove(*labels)
                self.lag_labels.discard(labels)

    def _update_gauges(self) -> None:
        assignment = self.consumer.assignment()
        self.metrics.assigned.set(len(assignment))
        for tp in assignment:
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            position = self.processed.get(tp)
            if position is None:
                continue
            labels = (tp.topic, str(tp.partition))
            self.metrics.lag.labels(*labels).set(max(0, high - position))
            self.lag_labels.add(labels)


def _permanent(exc: BaseException) -> bool:
    """An error the broker says a retry cannot fix (too large, invalid topic, not authorised)."""
    return isinstance(exc, BrokerResponseError) and not exc.retriable


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _spill_line(record: ConsumerRecord, rejected: EventRejected, exc: BaseException, dlq_topic: str,
                headers: list[tuple[str, bytes]]) -> str:
    entry = {
        "topic": record.topic, "partition": record.partition, "offset": record.offset, "timestamp_ms": record.timestamp,
        "key": _b64(record.key), "value": _b64(record.value),
        "headers": [[name, _b64(value)] for name, value in headers],
        "record_headers": [[name, _b64(value)] for name, value in (record.headers or ())],
        "dlq_topic": dlq_topic, "error": f"{type(exc).__name__}: {exc}", "spilled_at_ms": int(time.time() * 1000),
    }
    return json.dumps(entry, separators=(",", ":")) + "\n"


def _fsync_dir(path: Path) -> None:
    """A new file's directory entry is durable only once the directory itself is fsync'd."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(settings: Settings) -> None:
    """Serve metrics, consume until SIGTERM/SIGINT, then finish the batch, commit and exit."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    disable_created_metrics()  # *_created series only add noise to dashboards
    registry = CollectorRegistry()

    async def serve() -> None:
        consumer = FeatureConsumer(settings, registry)  # aiokafka clients belong to the running loop
        start_http_server(settings.features.metrics_port, settings.features.metrics_host, registry=registry)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await consumer.run(stop)

    asyncio.run(serve())
