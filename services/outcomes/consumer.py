"""`vitrine outcomes run`: joins exposures (`recs.served`) with the same users' later events (`events`).

One aiokafka consumer group reads both topics. Both are keyed by user id and have the same partition
count, so a user's exposures and events sit on the same partition *number*; the group uses the range
assignor, which gives partition p of both topics to the same member (co-partitioning, as Kafka Streams
requires for a join). A user's join state therefore has one writer at a time, which is what lets the
join run in Python between a read and an atomic conditional write (see store.py).

Per batch (at most `max_batch` records from `getmany`, both topics mixed):
1. exposures are parsed with the `Exposure` contract, events with `parse_event`; rejects go to
   `outcomes.dlq` with a `reason` header, with the features consumer's bounded retries and fsync'd spill;
2. the batch's users' state is read in one pipelined round trip and joined by `attribution.attribute`;
3. the changes and both topics' next offsets are written by one Lua script, only if the stored offset of
   every partition this member owns is the one it last stored or sought to. Otherwise (Redis rolled
   back, or another member wrote them) nothing is written and the consumer seeks to the stored offsets;
4. Kafka commits are a hint for lag tooling, every `commit_interval_s`; on assignment the consumer
   seeks to the offsets stored in Redis.

Duplicates and replays change nothing (request_id and event_id are remembered per user), so a SIGKILL
at any point loses nothing and counts nothing twice: what was written is consistent with its offsets.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import defaultdict
from pathlib import Path

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server

from vitrine.contracts.events import Event, EventRejected, parse_event
from vitrine.contracts.exposures import Exposure
from vitrine.services.dead_letters import DeadLetters, Rejects, with_redis_retry
from vitrine.services.gateway.experiment import ExperimentStore
from vitrine.services.heap import freeze_startup_objects
from vitrine.services.partition_lag import PartitionLag
from vitrine.services.outcomes.attribution import APPLIED, CONFLICT, DUPLICATE, UserChanges, Windows, attribute, parse_exposure
from vitrine.services.outcomes.metrics import OutcomeMetrics
from vitrine.services.outcomes.monitor import ExperimentMonitor
from vitrine.services.outcomes.store import OutcomeStore
from vitrine.settings import Settings

log = logging.getLogger(__name__)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, owner: OutcomeConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self.owner.batch_lock:
            await self.owner.commit_processed(revoked)
            self.owner.forget(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.owner.seek_to_stored_offsets(assigned)


class OutcomeConsumer:
    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.cfg = cfg = settings.outcomes
        self.registry = registry or CollectorRegistry()
        self.metrics = OutcomeMetrics(self.registry)
        self.redis = aioredis.Redis(host=settings.redis.host, port=settings.redis.port, socket_timeout=5, socket_connect_timeout=5)
        self.store = OutcomeStore(self.redis, cfg)
        self.windows = Windows(cfg.click_window_s * 1000, cfg.add_to_cart_window_s * 1000, cfg.purchase_window_s * 1000,
                               cfg.max_lateness_s * 1000)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka.bootstrap_servers,
            group_id=cfg.group_id,
            client_id=f"{cfg.group_id}-consumer",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=cfg.max_batch,
            fetch_max_wait_ms=cfg.poll_timeout_ms,
            # Partition p of both topics to the same member: a user's exposures and events meet in one place.
            partition_assignment_strategy=(RangePartitionAssignor,),
        )
        self.producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka.bootstrap_servers, acks="all", enable_idempotence=True,
            client_id=f"{cfg.group_id}-dlq", request_timeout_ms=cfg.dlq_send_timeout_ms,
        )
        self.batch_lock = asyncio.Lock()
        self.processed: dict[TopicPartition, int] = {}
        """Next offset per owned partition as stored in Redis by (or sought to from) this consumer."""
        self.partition_lag = PartitionLag(self.metrics.lag, self.metrics.assigned)
        self.last_commit = 0.0
        self.last_offset_check = time.monotonic()
        self.dead_letters = DeadLetters(self.producer, cfg.dlq_topic, cfg.dlq_send_attempts, cfg.redis_retry_max_s, self.spill_path,
                                        self.metrics.write_retries.inc, lambda reason: self.metrics.dlq_spilled.labels(reason).inc())

    @property
    def spill_path(self) -> Path:
        return self.cfg.dlq_spill_dir / f"{self.cfg.group_id}.jsonl"

    # --- lifecycle ------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        await self.producer.start()
        self.consumer.subscribe([self.cfg.exposures_topic, self.cfg.events_topic], listener=_Rebalance(self))
        await self.consumer.start()
        freeze_startup_objects()
        log.info("joining %s with %s as group %s", self.cfg.exposures_topic, self.cfg.events_topic, self.cfg.group_id)
        monitor = ExperimentMonitor(self.store, ExperimentStore(self.redis, self.settings.features.namespace), self.metrics,
                                    self.cfg.monitor_interval_s, self.cfg.monitor_history)
        monitoring = asyncio.create_task(monitor.run_forever())
        try:
            while not stop.is_set():
                batch = await self.consumer.getmany(timeout_ms=self.cfg.poll_timeout_ms, max_records=self.cfg.max_batch)
                if batch:
                    async with self.batch_lock:
                        await self.process(batch)
                elif time.monotonic() - self.last_offset_check >= self.cfg.offset_check_interval_s:
                    async with self.batch_lock:
                        await self.rewind_if_redis_differs()
                self._update_gauges()
        finally:
            monitoring.cancel()
            await asyncio.gather(monitoring, return_exceptions=True)
            async with self.batch_lock:
                await self.commit_processed(self.consumer.assignment())
            await self.consumer.stop()
            await self.producer.stop()
            await self.redis.aclose()
            log.info("stopped after committing %d partitions", len(self.processed))

    async def seek_to_stored_offsets(self, assigned: set[TopicPartition]) -> None:
        stored = await self._with_redis_retry(lambda: self.store.stored_offsets(self.cfg.group_id))
        for tp in assigned:
            offset = stored.get((tp.topic, tp.partition))
            if offset is not None:
                self.consumer.seek(tp, offset)
                self.processed[tp] = offset

    async def rewind_if_redis_differs(self) -> None:
        """Idle check: Redis may have rolled back while no batch arrived to notice."""
        self.last_offset_check = time.monotonic()
        stored = await self._with_redis_retry(lambda: self.store.stored_offsets(self.cfg.group_id))
        differ = {
            (tp.topic, tp.partition): stored.get((tp.topic, tp.partition), -1)
            for tp in self.consumer.assignment()
            if tp in self.processed and stored.get((tp.topic, tp.partition), -1) != self.processed[tp]
        }
        if differ:
            await self._rewind(differ, {})

    async def _rewind(self, differ: dict[tuple[str, int], int], batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """Seek back after a refused write: a partition whose stored offset differs goes there (the beginning
        if Redis has none), the batch's other partitions to their first unwritten record."""
        for tp, records in batch.items():
            if (tp.topic, tp.partition) not in differ:
                self.consumer.seek(tp, records[0].offset)
        for (topic, partition), stored in differ.items():
            tp = TopicPartition(topic, partition)
            log.warning("Redis holds offset %d for %s:%d, this consumer expected %s (Redis lost writes, or another member "
                        "wrote): re-reading from Redis's", stored, topic, partition, self.processed.get(tp))
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
            log.warning("commit to Kafka failed (%s); the offsets are safe in Redis", exc)

    # --- one batch ------------------------------------------------------------------------------
    def _parse(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> tuple[dict[str, list[Exposure | Event]], list]:
        now_ms = int(time.time() * 1000)
        by_user: dict[str, list[Exposure | Event]] = defaultdict(list)
        rejects: list[tuple[ConsumerRecord, EventRejected]] = []
        for tp, records in batch.items():
            exposures = tp.topic == self.cfg.exposures_topic
            (self.metrics.exposures_consumed if exposures else self.metrics.events_consumed).inc(len(records))
            for record in records:
                try:
                    if exposures:
                        parsed: Exposure | Event = parse_exposure(record.value, now_ms=now_ms)
                    elif record.value is None:
                        raise EventRejected("not_json", "empty record value")
                    else:
                        parsed = parse_event(record.value, now_ms=now_ms)
                except EventRejected as rejected:
                    rejects.append((record, rejected))
                    continue
                by_user[parsed.user_id].append(parsed)
        return by_user, rejects

    async def process(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        started = time.perf_counter()
        by_user, rejects = self._parse(batch)
        if rejects:
            await self._dead_letter(rejects)
        next_offsets = {(tp.topic, tp.partition): records[-1].offset + 1 for tp, records in batch.items()}
        # Every owned partition is checked, not only the batch's: a user's state may have been written through
        # the other topic's partition, and a write by anyone else since must refuse this batch.
        expected = {(tp.topic, tp.partition): self.processed.get(tp, -1) for tp in {*self.consumer.assignment(), *batch}}

        async def join_and_write() -> tuple[list[UserChanges], dict[tuple[str, int], int]]:
            wanted = {user: ([r.event_id for r in rs if isinstance(r, Event)], [r.request_id for r in rs if isinstance(r, Exposure)])
                      for user, rs in by_user.items()}
            states = await self.store.load(wanted)
            changes = [attribute(states[user], records, self.windows) for user, records in by_user.items()]
            return changes, await self.store.write(changes, self.cfg.group_id, next_offsets, expected)

        changes, differ = await self._with_redis_retry(join_and_write)
        if differ:
            await self._rewind(differ, batch)
            return
        self._count(changes)
        for tp, records in batch.items():
            self.processed[tp] = records[-1].offset + 1
        if time.monotonic() - self.last_commit >= self.cfg.commit_interval_s:
            await self.commit_processed(self.consumer.assignment())
        self.metrics.batch_size.observe(sum(len(r) for r in batch.values()))
        self.metrics.batch_duration.observe(time.perf_counter() - started)

    def _count(self, changes: Sequence[UserChanges]) -> None:
        m = self.metrics
        for c in changes:
            for exposure, verdict in c.exposure_verdicts:
                if verdict == APPLIED:
                    m.exposures.labels(exposure.experiment, exposure.variant).inc()
                    m.impressions.labels(exposure.experiment, exposure.variant).inc(len(exposure.item_ids))
                elif verdict == DUPLICATE:
                    m.duplicates.labels("exposure").inc()
                elif verdict == CONFLICT:
                    m.variant_conflicts.labels(exposure.experiment).inc()
                    log.warning("user %s seen in variant %s of %s revision %d after another variant: exposure %s ignored",
                                exposure.user_id, exposure.variant, exposure.experiment, exposure.revision, exposure.request_id)
            m.duplicates.labels("event").inc(sum(v == DUPLICATE for _, v in c.event_verdicts))
            for experiment, variant, kind in c.credits:
                m.attributed.labels(experiment, variant, kind.value).inc()
            if c.recredits:
                m.recredits.inc(c.recredits)

    # --- the DLQ and Redis retries: the features consumer's discipline (services/dead_letters.py) ---------
    async def _dead_letter(self, rejects: Rejects) -> None:
        await self.dead_letters.send(rejects)
        for _, rejected in rejects:
            self.metrics.rejected.labels(rejected.reason).inc()

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
    disable_created_metrics()
    registry = CollectorRegistry()

    async def serve() -> None:
        consumer = OutcomeConsumer(settings, registry)
        start_http_server(settings.outcomes.metrics_port, settings.outcomes.metrics_host, registry=registry)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await consumer.run(stop)

    asyncio.run(serve())
