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
import time
from collections import defaultdict

import redis.asyncio as aioredis
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from prometheus_client import CollectorRegistry

from vitrine.contracts.events import Event, EventRejected, parse_event
from vitrine.contracts.exposures import Exposure
from vitrine.services.gateway.experiment import ExperimentStore
from vitrine.services.heap import freeze_startup_objects
from vitrine.services.member import Rebalance, StoredOffsetsMember, require_no_eviction, serve_until_signalled
from vitrine.services.outcomes.attribution import APPLIED, CONFLICT, DUPLICATE, UserChanges, Windows, attribute, parse_exposure
from vitrine.services.outcomes.metrics import OutcomeMetrics
from vitrine.services.outcomes.monitor import ExperimentMonitor
from vitrine.services.outcomes.store import OutcomeStore
from vitrine.settings import Settings

log = logging.getLogger(__name__)


class OutcomeConsumer(StoredOffsetsMember):
    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.cfg = cfg = settings.outcomes
        self.registry = registry or CollectorRegistry()
        self.metrics = OutcomeMetrics(self.registry)
        self.redis = aioredis.Redis(host=settings.redis.host, port=settings.redis.port, socket_timeout=5, socket_connect_timeout=5)
        self.store = OutcomeStore(self.redis, cfg, on_corrupt=lambda part: self.metrics.corrupt_state.labels(part).inc())
        self.windows = Windows(cfg.click_window_s * 1000, cfg.add_to_cart_window_s * 1000, cfg.purchase_window_s * 1000,
                               cfg.max_lateness_s * 1000, cfg.max_clock_skew_s * 1000)
        # Partition p of both topics to the same member: a user's exposures and events meet in one place.
        self._init_member(settings.kafka.bootstrap_servers, partition_assignment_strategy=(RangePartitionAssignor,))

    # --- lifecycle ------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        await self._with_redis_retry(lambda: require_no_eviction(self.redis))
        await self.producer.start()
        self.consumer.subscribe([self.cfg.exposures_topic, self.cfg.events_topic], listener=Rebalance(self))
        await self.consumer.start()
        freeze_startup_objects()
        log.info("joining %s with %s as group %s", self.cfg.exposures_topic, self.cfg.events_topic, self.cfg.group_id)
        monitor = ExperimentMonitor(self.store, ExperimentStore(self.redis, self.settings.features.namespace), self.metrics, self.cfg)
        monitoring = asyncio.create_task(monitor.run_forever())
        try:
            await self.consume(stop)
        finally:
            monitoring.cancel()
            await asyncio.gather(monitoring, return_exceptions=True)
            await self.consumer.stop()
            await self.producer.stop()
            await self.redis.aclose()
            log.info("stopped after committing %d partitions", len(self.processed))

    async def stored_offsets(self) -> dict[tuple[str, int], int]:
        return await self.store.stored_offsets(self.cfg.group_id)

    def disagrees(self, stored: int, own: int) -> bool:
        """Any difference: the write script also refuses when another member wrote the partition's offset."""
        return stored != own

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
            await self.dead_letter(rejects)
        next_offsets = {(tp.topic, tp.partition): records[-1].offset + 1 for tp, records in batch.items()}
        # Every owned partition is checked, not only the batch's: a user's state may have been written through
        # the other topic's partition, and a write by anyone else since must refuse this batch.
        expected = {(tp.topic, tp.partition): self.processed.get(tp, -1) for tp in {*self.consumer.assignment(), *batch}}

        async def join_and_write() -> tuple[list[UserChanges], dict[tuple[str, int], int]]:
            wanted = {user: ([r.event_id for r in rs if isinstance(r, Event)], [r.request_id for r in rs if isinstance(r, Exposure)])
                      for user, rs in by_user.items()}
            states = await self.store.load(wanted)
            now_ms = int(time.time() * 1000)
            changes = [attribute(states[user], records, self.windows, now_ms) for user, records in by_user.items()]
            return changes, await self.store.write(changes, self.cfg.group_id, next_offsets, expected)

        changes, differ = await self._with_redis_retry(join_and_write)
        if differ:
            await self.rewind(differ, batch)
            return
        self._count(changes)
        await self.stored(batch, started)

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


def main(settings: Settings) -> None:
    """Serve metrics, consume until SIGTERM/SIGINT, then finish the batch, commit and exit."""
    serve_until_signalled(lambda registry: OutcomeConsumer(settings, registry), settings.outcomes.metrics_host, settings.outcomes.metrics_port)
