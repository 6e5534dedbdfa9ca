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
import os
import signal
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from vitrine.contracts.events import Event, EventRejected, parse_event
from vitrine.contracts.exposures import Exposure
from vitrine.services.features.consumer import DLQ_DETAIL_MAX, _DlqFailure, _fsync_dir, _permanent, _spill_line
from vitrine.services.gateway.experiment import ExperimentStore
from vitrine.services.heap import freeze_startup_objects
from vitrine.services.outcomes.attribution import APPLIED, CONFLICT, DUPLICATE, UserChanges, Windows, attribute, parse_exposure
from vitrine.services.outcomes.metrics import OutcomeMetrics
from vitrine.services.outcomes.monitor import ExperimentMonitor
from vitrine.services.outcomes.store import OutcomeStore
from vitrine.settings import Settings

log = logging.getLogger(__name__)
RETRYABLE = (aioredis.ConnectionError, aioredis.TimeoutError, ConnectionError, OSError)
RETRY_BACKOFF_S = 0.05
Rejects = Sequence[tuple[ConsumerRecord, EventRejected]]


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
        self.lag_labels: set[tuple[str, str]] = set()
        self.last_commit = 0.0
        self.last_offset_check = time.monotonic()

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

    # --- the DLQ (the features consumer's discipline: bounded retries, then an fsync'd spill) ----------
    async def _dead_letter(self, rejects: Rejects) -> None:
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
        failed = []
        for f in retry:
            try:
                await (await self._send(f.record, f.rejected))
            except Exception as exc:  # noqa: BLE001 - any failure is retried or spilled, never dropped
                failed.append(_DlqFailure(f.record, f.rejected, exc, alone=True))
        return failed

    def _spill(self, failed: Sequence[_DlqFailure]) -> None:
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
    async def _with_redis_retry(self, call):  # noqa: ANN001, ANN202
        def count(state) -> None:  # noqa: ANN001 - tenacity's RetryCallState
            self.metrics.write_retries.inc()
            log.warning("retrying after %s (attempt %d)", state.outcome.exception(), state.attempt_number)

        retrying = AsyncRetrying(retry=retry_if_exception_type(RETRYABLE),
                                 wait=wait_exponential(multiplier=RETRY_BACKOFF_S, max=self.cfg.redis_retry_max_s),
                                 before_sleep=count, reraise=True)
        async for attempt in retrying:
            with attempt:
                return await call()
        raise AssertionError("unreachable")

    def forget(self, partitions: set[TopicPartition]) -> None:
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
            position = self.processed.get(tp)
            if high is None or position is None:
                continue
            labels = (tp.topic, str(tp.partition))
            self.metrics.lag.labels(*labels).set(max(0, high - position))
            self.lag_labels.add(labels)


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
