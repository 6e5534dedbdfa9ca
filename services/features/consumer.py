"""`vitrine features run`: an aiokafka consumer group member that keeps the feature store current.

Per batch (at most `max_batch` records from `getmany`):
1. every record is validated against the event schema; rejects go to `events.dlq` with the reason
   and their origin (awaited: a record is never dropped silently);
2. the valid events and the partitions' next offsets are written to Redis in one atomic script;
   duplicates (by event_id, within the dedupe window) change nothing;
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
from collections.abc import Sequence

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from vitrine.contracts import topics
from vitrine.contracts.events import Event, EventRejected, parse_event
from vitrine.services.features.metrics import FeatureMetrics
from vitrine.services.features.store import FeatureStore
from vitrine.services.heap import freeze_startup_objects
from vitrine.settings import Settings

log = logging.getLogger(__name__)
DLQ_DETAIL_MAX = 1000
RETRYABLE = (aioredis.ConnectionError, aioredis.TimeoutError, ConnectionError, OSError)


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
            client_id=f"{self.cfg.group_id}-dlq",
        )
        self.batch_lock = asyncio.Lock()
        self.processed: dict[TopicPartition, int] = {}
        self.lag_labels: set[tuple[str, str]] = set()
        self.last_commit = 0.0

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

    async def commit_processed(self, partitions: set[TopicPartition]) -> None:
        offsets = {tp: self.processed[tp] for tp in partitions if tp in self.processed}
        self.last_commit = time.monotonic()
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except Exception as exc:  # noqa: BLE001 - Kafka's commit is a hint; Redis holds the truth
            log.warning("commit to Kafka failed (%s); offsets are safe in Redis", exc)

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
        result = await self._with_redis_retry(lambda: self.store.apply(events, self.cfg.group_id, next_offsets))
        visible_s = time.time()
        for event, applied in zip(events, result.applied, strict=True):
            if applied:
                self.metrics.applied.labels(event.type.value).inc()
                self.metrics.freshness.observe(max(0.0, visible_s - event.ts_ms / 1000))
            else:
                self.metrics.deduplicated.labels(event.type.value).inc()
        for tp, records in batch.items():
            self.processed[tp] = records[-1].offset + 1
        if time.monotonic() - self.last_commit >= self.cfg.commit_interval_s:
            await self.commit_processed(self.consumer.assignment())
        self.metrics.batch_size.observe(sum(len(r) for r in batch.values()))
        self.metrics.batch_duration.observe(time.perf_counter() - started)

    async def _dead_letter(self, rejects: Sequence[tuple[ConsumerRecord, EventRejected]]) -> None:
        async for attempt in self._retrying(Exception):
            with attempt:
                sends = []
                for record, rejected in rejects:
                    headers = [
                        ("reason", rejected.reason.encode()),
                        ("detail", rejected.detail[:DLQ_DETAIL_MAX].encode()),
                        ("source", f"{record.topic}:{record.partition}:{record.offset}".encode()),
                    ]
                    sends.append(await self.producer.send(topics.EVENTS_DLQ, value=record.value or b"", key=record.key, headers=headers))
                await asyncio.gather(*sends)
        for _, rejected in rejects:
            self.metrics.rejected.labels(rejected.reason).inc()

    # --- helpers --------------------------------------------------------------------------------
    def _retrying(self, *kinds: type[BaseException]) -> AsyncRetrying:
        def count(state) -> None:  # noqa: ANN001 - tenacity's RetryCallState
            self.metrics.write_retries.inc()
            log.warning("retrying after %s (attempt %d)", state.outcome.exception(), state.attempt_number)

        return AsyncRetrying(
            retry=retry_if_exception_type(kinds or RETRYABLE),
            wait=wait_exponential(multiplier=0.05, max=self.cfg.redis_retry_max_s),
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
