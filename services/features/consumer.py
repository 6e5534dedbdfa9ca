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
import logging
import signal
import time
from pathlib import Path

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server

from vitrine.contracts.events import Event, EventRejected, parse_event
from vitrine.services.dead_letters import DeadLetters, Rejects, with_redis_retry
from vitrine.services.features.metrics import FeatureMetrics
from vitrine.services.features.store import FeatureStore, WriteResult
from vitrine.services.heap import freeze_startup_objects
from vitrine.services.partition_lag import PartitionLag
from vitrine.settings import Settings

log = logging.getLogger(__name__)


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
        self.partition_lag = PartitionLag(self.metrics.lag, self.metrics.assigned)
        self.last_commit = 0.0
        self.last_offset_check = time.monotonic()
        self.dead_letters = DeadLetters(self.producer, self.cfg.dlq_topic, self.cfg.dlq_send_attempts, self.cfg.redis_retry_max_s,
                                        self.spill_path, self.metrics.write_retries.inc,
                                        lambda reason: self.metrics.dlq_spilled.labels(reason).inc())

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
        """Rejects to the DLQ with bounded retries, or to the spill file (services/dead_letters.py)."""
        await self.dead_letters.send(rejects)
        for _, rejected in rejects:
            self.metrics.rejected.labels(rejected.reason).inc()

    # --- helpers --------------------------------------------------------------------------------
    async def _with_redis_retry(self, call):  # noqa: ANN001, ANN202
        return await with_redis_retry(call, self.cfg.redis_retry_max_s, self.metrics.write_retries.inc)

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Partitions this member no longer owns: no commits, no lag series for them."""
        for tp in partitions:
            self.processed.pop(tp, None)
        self.partition_lag.forget(partitions)

    def _update_gauges(self) -> None:
        self.partition_lag.update(self.consumer, self.processed)



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
