"""A consumer group member whose results and next offsets live together in Redis — the one place
where Vitrine's exactly-once-effect discipline is written, for every consumer that follows it (the
feature consumer and the outcome service).

- On assignment the member seeks to the offsets stored in Redis (Kafka's commits are only a hint).
- **No offset stored in Redis for a partition means: nothing of that partition is in Redis, read it from
  the beginning** — at assignment and after a refused write alike (`seek_to_unstored`). Kafka's committed
  offset is never used to resume: it may be ahead of what Redis holds (Redis flushed or restored from an
  older copy), and resuming there would skip effects Redis no longer has. Replaying from the beginning is
  safe: the stores deduplicate by event id / request id.
- Redis must not evict what exactly-once needs (`eviction_risk`, checked at start by `require_no_eviction`):
  an evicting policy can drop results or dedupe sets while the offsets survive, and no offset check notices.
- Each batch is written with the offsets this member expects Redis to hold; a refused write (Redis
  rolled back, or — where a store checks for it — another member wrote) makes it seek to Redis's
  offsets and read again (`rewind`). While idle, the same comparison runs every
  `offset_check_interval_s`, so a rollback is replayed even when no batch arrives to notice it.
- A rebalance waits for the batch in flight, commits what it stored and drops the revoked
  partitions' lag series; stopping commits too.
- Rejects go to the DLQ, Redis writes are retried while Redis is away (`services/dead_letters.py`). A reject
  is sent (and counted) once per member: records read again after a refused write are not sent again
  (`dead_letter` remembers what it sent). The send stays *before* the write on purpose: after it, a crash
  between the write and the send would lose the reject (its offset is already stored); before it, a crash
  can only repeat a send, never lose one.

A subclass builds its Kafka clients, metrics (with the shared names: `write_retries`, `rejected`,
`dlq_spilled`, `offset_rewinds`, `lag`, `assigned`, `batch_size`, `batch_duration`) and store, calls
`_init_member`, and implements `process` and `stored_offsets`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
import redis.asyncio as aioredis
from aiokafka.abc import ConsumerRebalanceListener
from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server

from vitrine.services.dead_letters import DeadLetters, Rejects, with_redis_retry
from vitrine.services.partition_lag import PartitionLag

log = logging.getLogger(__name__)
T = TypeVar("T")
Batch = dict[TopicPartition, list[ConsumerRecord]]
Offsets = dict[tuple[str, int], int]
DEAD_LETTERED_KEPT = 100_000
"""Coordinates of rejects already sent that a member remembers (a refused write re-reads at most a few batches)."""
SAFE_POLICIES = frozenset({"noeviction"})


def eviction_risk(policy: str, maxmemory_bytes: int) -> str | None:
    """Why this Redis may silently drop exactly-once state (results, dedupe sets, pending joins, offsets), or None.

    Without a memory cap (`maxmemory` 0) nothing is evicted whatever the policy. With one, every policy but
    `noeviction` evicts: `volatile-*` the keys with a TTL (every per-user key of the stores has one, the offsets
    hash has none, so the offsets survive the loss and no offset check can notice), `allkeys-*` anything.
    With `noeviction` a full Redis refuses writes: the consumer retries and stops, it never loses."""
    if maxmemory_bytes <= 0 or policy in SAFE_POLICIES:
        return None
    return (f"Redis evicts keys under memory pressure (maxmemory-policy {policy}, maxmemory {maxmemory_bytes} bytes): it could drop "
            "stored results or dedupe sets while the offsets stay, breaking exactly-once without any error. Set "
            "`maxmemory-policy noeviction` (or maxmemory 0) on this Redis; `vitrine stack up` does.")


async def require_no_eviction(client: aioredis.Redis) -> None:
    """Refuse to start on a Redis that may evict this member's state (see `eviction_risk`). A Redis that does
    not allow CONFIG (some managed services) cannot be checked: a warning says so and the member starts."""
    try:
        policy = _text(next(iter((await client.config_get("maxmemory-policy")).values()), b""))
        maxmemory = int(_text(next(iter((await client.config_get("maxmemory")).values()), b"0")))
    except aioredis.ResponseError as exc:
        log.warning("cannot read Redis's eviction policy (%s): make sure it is noeviction, or exactly-once may silently break", exc)
        return
    if (risk := eviction_risk(policy, maxmemory)) is not None:
        raise RuntimeError(risk)


class Rebalance(ConsumerRebalanceListener):
    def __init__(self, owner: StoredOffsetsMember) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Wait for the batch in flight, then commit what it stored: the next owner starts right after it.
        async with self.owner.batch_lock:
            await self.owner.commit_processed(revoked)
            self.owner.forget(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # Under the batch lock, and counted: a batch `getmany` returned before these seeks may hold records read from
        # the old positions (Kafka's commit, or the beginning); `consume` drops it instead of joining it, and reads
        # again from where the seeks put the partitions.
        async with self.owner.batch_lock:
            await self.owner.seek_to_stored_offsets(assigned)
            self.owner.assignments += 1


class StoredOffsetsMember:
    cfg: Any
    """The service's settings section: group_id, poll_timeout_ms, max_batch, commit_interval_s,
    offset_check_interval_s, redis_retry_max_s and the dlq_* fields."""
    metrics: Any
    consumer: AIOKafkaConsumer
    producer: AIOKafkaProducer

    def _init_member(self, bootstrap_servers: str, **consumer_options: Any) -> None:
        """The member's Kafka clients and bookkeeping, made the same way in every service: a consumer that never
        auto-commits (offsets are stored with the effect) and starts at the earliest record of a new group, and
        an idempotent producer for the dead-letter topic. `consumer_options` add to the consumer's (e.g. an
        assignor)."""
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            group_id=self.cfg.group_id,
            client_id=f"{self.cfg.group_id}-consumer",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.cfg.max_batch,
            fetch_max_wait_ms=self.cfg.poll_timeout_ms,
            **consumer_options,
        )
        self.producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers, acks="all", enable_idempotence=True,
            client_id=f"{self.cfg.group_id}-dlq", request_timeout_ms=self.cfg.dlq_send_timeout_ms,
        )
        self.batch_lock = asyncio.Lock()
        self.assignments = 0
        """Assignments handled so far: a batch fetched under an earlier one is not processed."""
        self.dead_lettered: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        """(topic, partition, offset) of rejects this member sent, newest last (at most DEAD_LETTERED_KEPT)."""
        self.processed: dict[TopicPartition, int] = {}
        """Next offset per owned partition as stored in Redis by (or sought to from) this member."""
        self.partition_lag = PartitionLag(self.metrics.lag, self.metrics.assigned)
        self.last_commit = 0.0
        self.last_offset_check = time.monotonic()
        self.dead_letters = DeadLetters(self.producer, self.cfg.dlq_topic, self.cfg.dlq_send_attempts, self.cfg.redis_retry_max_s,
                                        self.spill_path, self.metrics.write_retries.inc,
                                        lambda reason: self.metrics.dlq_spilled.labels(reason).inc())

    # --- what a subclass provides -----------------------------------------------------------------
    async def process(self, batch: Batch) -> None:
        raise NotImplementedError

    async def stored_offsets(self) -> Offsets:
        """(topic, partition) → next offset, as stored in Redis for this member's group."""
        raise NotImplementedError

    def disagrees(self, stored: int, own: int) -> bool:
        """Whether Redis's offset for a partition means this member must read again from it: by default
        when Redis is behind (it lost writes); a store that also detects other writers overrides this."""
        return stored < own

    # --- the loop -------------------------------------------------------------------------------------
    @property
    def spill_path(self) -> Path:
        return self.cfg.dlq_spill_dir / f"{self.cfg.group_id}.jsonl"

    async def consume(self, stop: asyncio.Event) -> None:
        """Poll and process until `stop`; idle, compare offsets; at the end commit what was stored."""
        try:
            while not stop.is_set():
                assignments = self.assignments
                batch = await self.consumer.getmany(timeout_ms=self.cfg.poll_timeout_ms, max_records=self.cfg.max_batch)
                if batch:
                    async with self.batch_lock:
                        if self.assignments != assignments:
                            log.info("a rebalance sought partitions while a batch was fetched: reading again from the new positions")
                            for tp in set(batch) & self.consumer.assignment():  # getmany moved past them: back to the stored positions
                                if tp in self.processed:
                                    self.consumer.seek(tp, self.processed[tp])
                                else:
                                    await self.seek_to_unstored(tp)
                            continue
                        await self.process(batch)
                elif time.monotonic() - self.last_offset_check >= self.cfg.offset_check_interval_s:
                    async with self.batch_lock:
                        await self.rewind_if_redis_disagrees()
                self.partition_lag.update(self.consumer, self.processed)
        finally:
            async with self.batch_lock:
                await self.commit_processed(self.consumer.assignment())

    async def seek_to_stored_offsets(self, assigned: set[TopicPartition]) -> None:
        stored = await self._with_redis_retry(self.stored_offsets)
        for tp in assigned:
            offset = stored.get((tp.topic, tp.partition))
            if offset is not None:
                self.consumer.seek(tp, offset)
                self.processed[tp] = offset
            else:
                await self.seek_to_unstored(tp)

    async def seek_to_unstored(self, tp: TopicPartition) -> None:
        """A partition without an offset in Redis: nothing of it is stored, so it is read from its beginning
        (not from Kafka's commit, which may be ahead of what Redis holds). One meaning, used at assignment and rewind."""
        await self.consumer.seek_to_beginning(tp)
        self.processed.pop(tp, None)

    async def rewind_if_redis_disagrees(self) -> None:
        """Idle check: Redis may have rolled back while no batch arrived to notice."""
        self.last_offset_check = time.monotonic()
        stored = await self._with_redis_retry(self.stored_offsets)
        differ = {
            (tp.topic, tp.partition): stored.get((tp.topic, tp.partition), -1)
            for tp in self.consumer.assignment()
            if tp in self.processed and self.disagrees(stored.get((tp.topic, tp.partition), -1), self.processed[tp])
        }
        if differ:
            await self.rewind(differ, {})

    async def rewind(self, differ: Offsets, batch: Batch) -> None:
        """Seek back after a refused write: a partition whose stored offset differs goes there (the beginning
        if Redis has none), the batch's other partitions to their first unwritten record."""
        for tp, records in batch.items():
            if (tp.topic, tp.partition) not in differ:
                self.consumer.seek(tp, records[0].offset)
        for (topic, partition), stored in differ.items():
            tp = TopicPartition(topic, partition)
            log.warning("Redis holds offset %d for %s:%d where this consumer expected %s (Redis lost writes, or another "
                        "member wrote): re-reading from Redis's", stored, topic, partition, self.processed.get(tp))
            self.metrics.offset_rewinds.inc()
            if stored >= 0:
                self.consumer.seek(tp, stored)
                self.processed[tp] = stored
            else:
                await self.seek_to_unstored(tp)

    async def stored(self, batch: Batch, started: float) -> None:
        """After a batch and its offsets were written: remember them, commit at most every commit_interval_s."""
        for tp, records in batch.items():
            self.processed[tp] = records[-1].offset + 1
        if time.monotonic() - self.last_commit >= self.cfg.commit_interval_s:
            await self.commit_processed(self.consumer.assignment())
        self.metrics.batch_size.observe(sum(len(r) for r in batch.values()))
        self.metrics.batch_duration.observe(time.perf_counter() - started)

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

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Partitions this member no longer owns: no commits, no lag series for them."""
        for tp in partitions:
            self.processed.pop(tp, None)
        self.partition_lag.forget(partitions)

    async def dead_letter(self, rejects: Rejects) -> None:
        """Rejects to the DLQ with bounded retries, or to the spill file, then counted by reason — except those this
        member already sent (read again after a refused write): each reject is sent and counted once."""
        fresh = [(record, rejected) for record, rejected in rejects
                 if (record.topic, record.partition, record.offset) not in self.dead_lettered]
        if not fresh:
            return
        await self.dead_letters.send(fresh)
        for record, rejected in fresh:
            self.metrics.rejected.labels(rejected.reason).inc()
            self.dead_lettered[(record.topic, record.partition, record.offset)] = None
        while len(self.dead_lettered) > DEAD_LETTERED_KEPT:
            self.dead_lettered.popitem(last=False)

    async def _with_redis_retry(self, call: Callable[[], Awaitable[T]]) -> T:
        return await with_redis_retry(call, self.cfg.redis_retry_max_s, self.metrics.write_retries.inc)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Runnable(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...


def serve_until_signalled(make: Callable[[CollectorRegistry], _Runnable], metrics_host: str, metrics_port: int) -> None:
    """A member's process: metrics on `metrics_host:metrics_port`, run until SIGTERM/SIGINT, then finish
    the batch, commit and exit. `make` builds the member inside the running loop (aiokafka clients
    belong to the loop they are created in)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    disable_created_metrics()  # *_created series only add noise to dashboards
    registry = CollectorRegistry()

    async def serve() -> None:
        member = make(registry)
        start_http_server(metrics_port, metrics_host, registry=registry)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await member.run(stop)

    asyncio.run(serve())
