"""`vitrine archive run`: `events` and `recs.served` as Parquet files, the training data of record.

One aiokafka consumer group member (`StoredOffsetsMember`, like the feature consumer and the outcome
service), except that results and offsets live together in the archive's folder instead of Redis:

1. every polled record is parsed with its contract (`parse_event`, `parse_exposure`); rejects go to
   `archive.dlq` with the reason (bounded retries, fsync'd spill), and only valid rows are archived, as typed
   columns;
2. valid rows wait in a per-partition buffer; a buffer is flushed when it holds `flush_rows` rows or its
   oldest record has waited `flush_interval_s` (also while no records arrive), on a rebalance and at exit.
   A flush writes one file per event-time hour and commits the partition's next offset with them
   (`store.py`: stage → commit point → publish);
3. on assignment the member recovers the partition's files (roll forward a committed flush, delete what
   never committed) and seeks to the stored next offset — the beginning when the archive has none;
   Kafka's committed offsets are only a hint for lag tooling;
4. every `compaction_interval_s`, closed hours whose files of an owned partition number at least
   `compaction_min_files` are merged into one; the merged files are deleted `compaction_retention_s`
   later, so that readers which listed them before the merge can finish.

File work runs in a worker thread (`asyncio.to_thread`) under the member's batch lock, so a rebalance
waits for it. A SIGKILL anywhere loses nothing and duplicates nothing: what is not committed is read again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka import ConsumerRecord, TopicPartition
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from vitrine.contracts.events import EventRejected, parse_event
from vitrine.contracts.exposures import parse_exposure
from vitrine.services.archive.metrics import ArchiveMetrics
from vitrine.services.archive.store import ArchiveStore, OffsetsDisagree, Row, Staged
from vitrine.services.member import Batch, Offsets, Rebalance, StoredOffsetsMember, serve_until_signalled
from vitrine.settings import Settings

log = logging.getLogger(__name__)
FLUSH = "flush"
COMPACTION = "compaction"


@dataclass
class Buffer:
    """One partition's records read since its last flush: the offset range and the valid rows in it."""

    first: int
    last: int
    opened: float
    """time.monotonic() when its first record was read."""
    rows: list[Row] = field(default_factory=list)


class _FlushingRebalance(Rebalance):
    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # What is buffered becomes a file before the next owner starts (else it would read it again: also correct).
        owner: ArchiveConsumer = self.owner  # type: ignore[assignment]
        async with owner.batch_lock:
            await owner.flush_partitions(revoked & owner.buffers.keys())
            await owner.commit_processed(revoked)
            owner.forget(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # aiokafka may assign while a batch or a flush is in flight (seen: a rejoin that revoked nothing); the
        # seek drops buffers and resets offsets, so it waits for that work to finish instead of racing it.
        async with self.owner.batch_lock:
            await self.owner.seek_to_stored_offsets(assigned)


class ArchiveConsumer(StoredOffsetsMember):
    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.cfg = cfg = settings.archive
        self.registry = registry or CollectorRegistry()
        self.metrics = ArchiveMetrics(self.registry)
        self.store = ArchiveStore(settings.archive_root, {"events": cfg.events_topic, "exposures": cfg.exposures_topic},
                                  compression=cfg.compression)
        self.buffers: dict[TopicPartition, Buffer] = {}
        self.last_compaction = 0.0
        self.fatal: BaseException | None = None
        """Set when recovery finds files that contradict the protocol; the loop then stops (aiokafka swallows
        exceptions raised in rebalance callbacks, and consuming on would read from Kafka's offsets instead)."""
        self._init_member(settings.kafka.bootstrap_servers)

    # --- lifecycle ------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        await asyncio.to_thread(self.store.root.mkdir, parents=True, exist_ok=True)
        await self.producer.start()
        self.consumer.subscribe([self.cfg.events_topic, self.cfg.exposures_topic], listener=_FlushingRebalance(self))
        await self.consumer.start()
        log.info("archiving %s and %s into %s as group %s", self.cfg.events_topic, self.cfg.exposures_topic, self.store.root, self.cfg.group_id)
        upkeep = asyncio.create_task(self._upkeep(stop))
        upkeep.add_done_callback(lambda task: task.cancelled() or task.exception() is None or self._give_up(task.exception()))
        try:
            await self.consume(stop)
        finally:
            upkeep.cancel()
            await asyncio.gather(upkeep, return_exceptions=True)
            if self.fatal is None:
                async with self.batch_lock:
                    await self.flush_partitions(set(self.buffers))  # SIGTERM: what was read is archived before exit
                    await self.commit_processed(self.consumer.assignment())
            await self.consumer.stop()
            await self.producer.stop()
            log.info("stopped after committing %d partitions", len(self.processed))
        self._raise_if_fatal()

    def _give_up(self, exc: BaseException) -> None:
        """Stop consuming: nothing more is buffered or committed; the supervisor restarts the process, whose
        recovery starts from the files (a problem that persists shows as a crash loop with this log line)."""
        log.critical("archiving stopped: %s: %s", type(exc).__name__, exc)
        self.fatal = exc
        self._stop.set()

    async def stored_offsets(self) -> Offsets:
        owned = [(tp.topic, tp.partition) for tp in self.consumer.assignment()]
        return await asyncio.to_thread(self.store.next_offsets, owned)

    def disagrees(self, stored: int, own: int) -> bool:
        """Any difference: the archive has one writer per partition, so another value means another writer."""
        return stored != own

    async def seek_to_stored_offsets(self, assigned: set[TopicPartition]) -> None:
        """Recover each partition's files, then seek to its stored next offset, or to the beginning when the
        archive has none (Kafka's committed offsets are not the archive's: after a wiped archive they would skip)."""
        try:
            recoveries = await self._with_redis_retry(lambda: asyncio.to_thread(self._recover, assigned))
        except Exception as exc:  # noqa: BLE001 - any failure here must stop the member, not be swallowed by aiokafka
            self.consumer.pause(*assigned)  # not one record read before the process exits
            self._give_up(exc)
            return
        for tp in assigned:
            self.buffers.pop(tp, None)
            offset = recoveries[tp]
            if offset is None:
                await self.consumer.seek_to_beginning(tp)
                self.processed.pop(tp, None)
            else:
                self.consumer.seek(tp, offset)
                self.processed[tp] = offset

    def _recover(self, assigned: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
        found = {}
        for tp in assigned:
            recovery = self.store.recover(tp.topic, tp.partition, self.cfg.compaction_retention_s)
            for action in ("rolled_forward", "temp_removed", "shadowed_removed"):
                if count := getattr(recovery, action):
                    self.metrics.recovered.labels(action).inc(count)
                    log.warning("%s:%d: %d files %s after an interrupted flush or compaction", tp.topic, tp.partition, count, action)
            found[tp] = recovery.next_offset
        return found

    async def rewind(self, differ: Offsets, batch: Batch) -> None:
        for topic, partition in differ:
            self.buffers.pop(TopicPartition(topic, partition), None)  # read again from the stored offset
        await super().rewind(differ, batch)

    # --- one batch ------------------------------------------------------------------------------
    async def _current(self, batch: Batch) -> Batch:
        """The batch without partitions sought (or revoked) since it was fetched: a rebalance may run between
        `getmany` and this batch taking the lock, and its seek to the stored offset makes those records stale
        (they are read again from there). getmany leaves the position one past the last record it returned."""
        assigned = self.consumer.assignment()
        current = {}
        for tp, records in batch.items():
            if tp in assigned and await self.consumer.position(tp) == records[-1].offset + 1:
                current[tp] = records
            else:
                log.info("%s:%d: %d records fetched before a rebalance's seek dropped (read again from the stored offset)",
                         tp.topic, tp.partition, len(records))
        return current

    async def process(self, batch: Batch) -> None:
        self._raise_if_fatal()
        batch = await self._current(batch)
        started = time.perf_counter()
        now_ms = int(time.time() * 1000)
        opened = time.monotonic()
        rejects: list[tuple[ConsumerRecord, EventRejected]] = []
        for tp, records in batch.items():
            table = self.store.table_of(tp.topic)
            self.metrics.consumed.labels(table).inc(len(records))
            buffer = self.buffers.get(tp)
            if buffer is None:
                buffer = self.buffers[tp] = Buffer(records[0].offset, records[0].offset, opened)
            for record in records:
                try:
                    value = self._parse(table, record.value, now_ms)
                except EventRejected as rejected:
                    rejects.append((record, rejected))
                    continue
                buffer.rows.append(Row(value, record.partition, record.offset, record.timestamp))
            buffer.last = records[-1].offset
        if rejects:
            await self.dead_letter(rejects)  # before their offsets are committed: a crash sends them again, never loses them
        await self.flush_partitions(self._due(time.monotonic()))
        self.metrics.batch_size.observe(sum(len(r) for r in batch.values()))
        self.metrics.batch_duration.observe(time.perf_counter() - started)

    def _raise_if_fatal(self) -> None:
        if self.fatal is not None:
            raise RuntimeError("the archive's files need a person to look (see the log above)") from self.fatal

    @staticmethod
    def _parse(table: str, raw: bytes | None, now_ms: int) -> BaseModel:
        if table == "exposures":
            return parse_exposure(raw, now_ms=now_ms)
        if raw is None:
            raise EventRejected("not_json", "empty record value")
        return parse_event(raw, now_ms=now_ms)

    def _due(self, now: float) -> set[TopicPartition]:
        return {tp for tp, b in self.buffers.items() if len(b.rows) >= self.cfg.flush_rows or now - b.opened >= self.cfg.flush_interval_s}

    async def flush_partitions(self, partitions: set[TopicPartition]) -> None:
        """Commit the buffers of `partitions` to the archive (caller holds the batch lock)."""
        for tp in sorted(partitions):
            buffer = self.buffers[tp]
            expected = self.processed.get(tp)
            started = time.perf_counter()
            try:
                staged = await self._with_redis_retry(lambda b=buffer, t=tp, e=expected: asyncio.to_thread(
                    self.store.flush, t.topic, t.partition, b.first, b.last, b.rows, e))
            except OffsetsDisagree as exc:
                await self.rewind({(tp.topic, tp.partition): exc.stored}, {})
                continue
            del self.buffers[tp]
            self.processed[tp] = buffer.last + 1
            self._count_flush(staged, time.perf_counter() - started)
        self._update_buffer_gauges()
        if partitions and time.monotonic() - self.last_commit >= self.cfg.commit_interval_s:
            await self.commit_processed(self.consumer.assignment())

    def _count_flush(self, staged: Staged, seconds: float) -> None:
        table = self.store.table_of(staged.topic)
        self.metrics.rows_written.labels(table).inc(staged.rows)
        self.metrics.files_written.labels(table, FLUSH).inc(len(staged.parts))
        self.metrics.bytes_written.labels(table, FLUSH).inc(staged.bytes)
        self.metrics.flush_duration.observe(seconds)

    def _update_buffer_gauges(self) -> None:
        self.metrics.buffered_rows.set(sum(len(b.rows) for b in self.buffers.values()))
        oldest = min((b.opened for b in self.buffers.values()), default=None)
        self.metrics.oldest_buffered.set(0.0 if oldest is None else time.monotonic() - oldest)

    def forget(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            self.buffers.pop(tp, None)
        super().forget(partitions)

    # --- flush by age and compaction, also while no records arrive -------------------------------
    async def _upkeep(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.cfg.flush_check_interval_s)
            except TimeoutError:
                pass
            async with self.batch_lock:
                await self.flush_partitions(self._due(time.monotonic()))
            if time.monotonic() - self.last_compaction >= self.cfg.compaction_interval_s:
                await self.compact_owned()

    async def compact_owned(self) -> None:
        """Merge the closed hours' small files of every partition this member owns.

        One hour folder per hold of the batch lock: a backlog of closed hours (say after a long outage)
        interleaves with consuming and rebalancing instead of stalling them."""
        self.last_compaction = time.monotonic()
        now_ms = int(time.time() * 1000)
        grace_ms = int(self.cfg.compaction_grace_s * 1000)
        for tp in sorted(self.consumer.assignment()):
            table = self.store.table_of(tp.topic)
            groups = await asyncio.to_thread(self.store.compaction_candidates, tp.topic, tp.partition, now_ms, grace_ms,
                                             self.cfg.compaction_min_files)
            for group in groups:
                async with self.batch_lock:
                    if tp not in self.consumer.assignment():
                        break  # revoked meanwhile: its new owner compacts it
                    # Listed outside the lock: a flush since may have added a file here; the group must be all of them.
                    current = await asyncio.to_thread(self.store.compaction_candidates, tp.topic, tp.partition, now_ms, grace_ms,
                                                      self.cfg.compaction_min_files)
                    group = next((g for g in current if g[0].folder == group[0].folder), None)
                    if group is None:
                        continue
                    started = time.perf_counter()
                    done = await self._with_redis_retry(
                        lambda g=group: asyncio.to_thread(self.store.compact, g, self.cfg.compaction_retention_s))
                self.metrics.compactions.labels(table).inc()
                self.metrics.files_compacted.labels(table).inc(done.merged)
                self.metrics.files_written.labels(table, COMPACTION).inc()
                self.metrics.bytes_written.labels(table, COMPACTION).inc(done.bytes)
                self.metrics.compaction_duration.observe(time.perf_counter() - started)
                log.info("compacted %d files of %s partition %d into one (%d rows)", done.merged, done.folder, done.partition, done.rows)
            if self.cfg.compaction_retention_s > 0:
                async with self.batch_lock:
                    if tp in self.consumer.assignment():
                        await asyncio.to_thread(self.store.remove_shadowed, tp.topic, tp.partition, self.cfg.compaction_retention_s)


def main(settings: Settings) -> None:
    """Serve metrics, archive until SIGTERM/SIGINT, then flush, commit and exit."""
    serve_until_signalled(lambda registry: ArchiveConsumer(settings, registry), settings.archive.metrics_host, settings.archive.metrics_port)
