"""`vitrine bench features`: the consumer's highest sustained rate, and freshness at half of it.

1. Throughput: a backlog of N events is published to a fresh topic first; then one consumer
   (`vitrine features run`, a separate process like in the stack) drains it. Rate = events / time
   from its first to its last stored offset. Its CPU time gives events per CPU-second (per core).
2. Freshness: a fresh consumer, and events published open-loop at half that rate, each timestamped
   at its send time; freshness (visible in Redis − event time) comes from the consumer's histogram.

Everything shares the machine's two cores with Kafka and Redis, as in the stack.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import psutil
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from vitrine.export.data import synthetic
from vitrine.loadtest import scrape
from vitrine.services.events.publisher import publish
from vitrine.services.features.metrics import BATCH_DURATION, BATCH_SIZE, FRESHNESS
from vitrine.services.features.store import FeatureStore
from vitrine.services.stack.components import settings_env
from vitrine.services.stack.launcher import free_port
from vitrine.services.stack.health import features_ready
from vitrine.settings import Settings

PARTITIONS = 4


@dataclass(frozen=True)
class FeatureBenchResult:
    events: int
    seconds: float
    events_per_s: float
    cpu_seconds: float
    events_per_cpu_s: float
    freshness_rate: float
    freshness_events: int
    freshness_p50_ms: float
    freshness_p99_ms: float
    publisher_behind_s: float
    redis_cpu_seconds: float
    mean_batch_events: float
    mean_batch_ms: float


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) pairs, linear within a bucket."""
    total = buckets[-1][1]
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return previous_bound
            span = count - previous_count
            return previous_bound + (bound - previous_bound) * ((rank - previous_count) / span if span else 0)
        previous_bound, previous_count = bound, count
    return previous_bound


class _Lane:
    def __init__(self, settings: Settings, tag: str) -> None:
        features = settings.features.model_copy(update={
            "events_topic": f"events.bench-{tag}", "group_id": f"bench-{tag}", "namespace": f"b{tag}",
            "metrics_port": free_port(),
        })
        self.settings = settings.model_copy(update={"features": features})
        self.redis = aioredis.Redis(host=settings.redis.host, port=settings.redis.port)
        self.store = FeatureStore(self.redis, features)
        self.process: subprocess.Popen | None = None

    async def create_topic(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka.bootstrap_servers)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(self.settings.features.events_topic, PARTITIONS, 1)])
        finally:
            await admin.close()

    async def start_consumer(self) -> psutil.Process:
        env = {**os.environ, **settings_env(self.settings)}
        self.process = subprocess.Popen([sys.executable, "-m", "vitrine", "features", "run"], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while await features_ready(self.settings) is not None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the benchmark consumer did not start")
            await asyncio.sleep(0.05)
        return psutil.Process(self.process.pid)

    async def processed(self) -> int:
        cfg = self.settings.features
        return sum((await self.store.stored_offsets(cfg.group_id, cfg.events_topic)).values())

    async def metrics_text(self) -> str:
        return await scrape.fetch(self.settings.features.metrics_host, self.settings.features.metrics_port)

    async def close(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka.bootstrap_servers)
        await admin.start()
        try:
            await admin.delete_topics([self.settings.features.events_topic])
        finally:
            await admin.close()
        async for key in self.redis.scan_iter(match=f"{self.settings.features.namespace}:*", count=1000):
            await self.redis.delete(key)
        await self.redis.aclose()


async def run(settings: Settings, events: int, freshness_seconds: float, freshness_rate: float | None = None,
              report=print) -> FeatureBenchResult:  # noqa: ANN001
    table = synthetic.generate(synthetic.preset("large"))
    tag = uuid.uuid4().hex[:8]

    throughput = _Lane(settings, f"{tag}t")
    await throughput.create_topic()
    try:
        report(f"publishing a backlog of {events} events …")
        await publish(table.events(), settings.kafka.bootstrap_servers, throughput.settings.features.events_topic, limit=events)
        process = await throughput.start_consumer()
        cpu_before = sum(process.cpu_times()[:2])
        redis_before = await _redis_cpu(throughput.redis)
        first_seen = None
        while (done := await throughput.processed()) < events:
            if done and first_seen is None:
                first_seen = (time.monotonic(), done)
            await asyncio.sleep(0.005)
        finished = time.monotonic()
        cpu = sum(process.cpu_times()[:2]) - cpu_before
        redis_cpu = await _redis_cpu(throughput.redis) - redis_before
        start_time, start_done = first_seen or (finished, 0)
        seconds = max(1e-9, finished - start_time)
        rate = (events - start_done) / seconds
        report(f"throughput: {rate:,.0f} events/s, {events / max(cpu, 1e-9):,.0f} events per CPU-second")
    finally:
        await throughput.close()

    fresh = _Lane(settings, f"{tag}f")
    await fresh.create_topic()
    try:
        await fresh.start_consumer()
        half = freshness_rate or rate / 2
        report(f"freshness: publishing at {half:,.0f} events/s for {freshness_seconds:g}s …")
        published = await publish(table.events(), settings.kafka.bootstrap_servers, fresh.settings.features.events_topic,
                                  rate=half, duration_s=freshness_seconds, retime=True)
        while await fresh.processed() < published.sent:
            await asyncio.sleep(0.01)
        text = await fresh.metrics_text()
        buckets = scrape.histogram_buckets(text, FRESHNESS)
        batch_events, batch_seconds = (scrape.histogram_totals(text, name)[""] for name in (BATCH_SIZE, BATCH_DURATION))
    finally:
        await fresh.close()
    return FeatureBenchResult(
        events=events, seconds=seconds, events_per_s=rate, cpu_seconds=cpu, events_per_cpu_s=events / max(cpu, 1e-9),
        freshness_rate=published.achieved_rate, freshness_events=published.sent,
        freshness_p50_ms=histogram_quantile(0.5, buckets) * 1000, freshness_p99_ms=histogram_quantile(0.99, buckets) * 1000,
        publisher_behind_s=published.max_behind_s, redis_cpu_seconds=redis_cpu,
        mean_batch_events=batch_events[0] / max(1, batch_events[1]),
        mean_batch_ms=1000 * batch_seconds[0] / max(1, batch_seconds[1]),
    )


async def _redis_cpu(client: aioredis.Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def render(result: FeatureBenchResult) -> str:
    return "\n".join([
        "| measure | value |",
        "| --- | ---: |",
        f"| highest sustained rate (backlog of {result.events:,} events drained) | {result.events_per_s:,.0f} events/s |",
        f"| consumer process CPU | {result.cpu_seconds:.1f} s → {result.events_per_cpu_s:,.0f} events per CPU-second |",
        f"| Redis CPU (the batch script) | {result.redis_cpu_seconds:.1f} s → {result.events / max(result.redis_cpu_seconds, 1e-9):,.0f} events per CPU-second |",
        f"| consumer + Redis | {result.events / max(result.cpu_seconds + result.redis_cpu_seconds, 1e-9):,.0f} events per CPU-second |",
        f"| freshness load: achieved rate (target half the above) | {result.freshness_rate:,.0f} events/s over {result.freshness_events:,} events |",
        f"| freshness p50 / p99 (histogram_quantile) | {result.freshness_p50_ms:.1f} ms / {result.freshness_p99_ms:.1f} ms |",
        f"| at half rate: mean batch | {result.mean_batch_events:,.0f} events, {result.mean_batch_ms:.1f} ms |",
        f"| publisher worst delay behind its schedule | {result.publisher_behind_s * 1000:.0f} ms |",
    ])
