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
import time

import redis.asyncio as aioredis
from aiokafka import ConsumerRecord, TopicPartition
from prometheus_client import CollectorRegistry

from vitrine.contracts.events import Event, EventRejected, parse_event
from vitrine.services.features.metrics import FeatureMetrics
from vitrine.services.features.store import FeatureStore, WriteResult
from vitrine.services.heap import freeze_startup_objects
from vitrine.services.member import Rebalance, StoredOffsetsMember, require_no_eviction, serve_until_signalled
from vitrine.settings import Settings

log = logging.getLogger(__name__)


class FeatureConsumer(StoredOffsetsMember):
    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.cfg = settings.features
        self.registry = registry or CollectorRegistry()
        self.metrics = FeatureMetrics(self.registry)
        self.redis = aioredis.Redis(host=settings.redis.host, port=settings.redis.port, socket_timeout=5, socket_connect_timeout=5)
        self.store = FeatureStore(self.redis, self.cfg)
        self._init_member(settings.kafka.bootstrap_servers)

    # --- lifecycle ------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        await self._with_redis_retry(lambda: require_no_eviction(self.redis))
        await self.producer.start()
        self.consumer.subscribe([self.cfg.events_topic], listener=Rebalance(self))
        await self.consumer.start()
        freeze_startup_objects()
        log.info("consuming %s as group %s", self.cfg.events_topic, self.cfg.group_id)
        try:
            await self.consume(stop)
        finally:
            await self.consumer.stop()
            await self.producer.stop()
            await self.redis.aclose()
            log.info("stopped after committing %d partitions", len(self.processed))

    async def stored_offsets(self) -> dict[tuple[str, int], int]:
        topic = self.cfg.events_topic
        return {(topic, p): o for p, o in (await self.store.stored_offsets(self.cfg.group_id, topic)).items()}

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
            await self.dead_letter(rejects)
        next_offsets = {(tp.topic, tp.partition): records[-1].offset + 1 for tp, records in batch.items()}
        expected = {(tp.topic, tp.partition): self.processed.get(tp, -1) for tp in batch}
        result = await self._with_redis_retry(lambda: self.store.apply(events, self.cfg.group_id, next_offsets, expected))
        if result.refused:
            await self.rewind(result.behind, batch)
            return
        self._count_applied(events, result)
        await self.stored(batch, started)

    def _count_applied(self, events: Sequence[Event], result: WriteResult) -> None:
        visible_s = time.time()
        for event, applied in zip(events, result.applied, strict=True):
            if applied:
                self.metrics.applied.labels(event.type.value).inc()
                self.metrics.freshness.observe(max(0.0, visible_s - event.ts_ms / 1000))
            else:
                self.metrics.deduplicated.labels(event.type.value).inc()


def main(settings: Settings) -> None:
    """Serve metrics, consume until SIGTERM/SIGINT, then finish the batch, commit and exit."""
    serve_until_signalled(lambda registry: FeatureConsumer(settings, registry), settings.features.metrics_host, settings.features.metrics_port)
