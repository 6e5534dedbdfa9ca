"""Publish storefront events to Kafka at a given rate, keyed by user id (one user's events stay ordered).

Used by `vitrine events generate` and `vitrine events replay`, by the demo and by the load tests.
The schedule is open-loop: event n is due at start + n/rate whatever the broker does, and the
report says when the publisher fell behind that schedule.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer

from vitrine.contracts.events import Event

MAX_IN_FLIGHT = 20_000
SLEEP_GRANULARITY_S = 0.002


@dataclass(frozen=True)
class PublishReport:
    sent: int
    seconds: float
    target_rate: float | None
    max_behind_s: float
    """Largest delay of a send behind its scheduled time: > a few ms means the rate was not held."""

    @property
    def achieved_rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


async def publish(
    events: Iterable[Event],
    bootstrap_servers: str,
    topic: str,
    rate: float | None = None,
    limit: int | None = None,
    duration_s: float | None = None,
    retime: bool = True,
) -> PublishReport:
    """Send `events` (at most `limit`, for at most `duration_s`) at `rate` per second (None: as fast as possible).

    With `retime`, each event's ts_ms becomes its send time, so that freshness can be measured.
    """
    if rate is not None and rate <= 0:
        raise ValueError("rate must be positive")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", enable_idempotence=True, linger_ms=2)
    await producer.start()
    sent, behind = 0, 0.0
    pending: list[asyncio.Future] = []
    start = time.monotonic()
    try:
        for event in events:
            if limit is not None and sent >= limit:
                break
            now = time.monotonic()
            if duration_s is not None and now - start >= duration_s:
                break
            if rate is not None:
                due = start + sent / rate
                if due - now > SLEEP_GRANULARITY_S:
                    await asyncio.sleep(due - now)
                else:
                    behind = max(behind, now - due)
            if retime:
                event = event.model_copy(update={"ts_ms": int(time.time() * 1000)})
            pending.append(await producer.send(topic, value=event.to_json(), key=event.user_id.encode()))
            sent += 1
            if len(pending) >= MAX_IN_FLIGHT:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return PublishReport(sent=sent, seconds=time.monotonic() - start, target_rate=rate, max_behind_s=behind)


class EventSink:
    """One long-lived producer for callers that publish events one at a time as they happen (the shopper
    simulator): same producer settings and key as `publish`. `send` returns once the record is queued;
    `flush` waits until every record sent so far is acknowledged (acks=all) and returns how many were."""

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        self.topic = topic
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", enable_idempotence=True, linger_ms=2)
        self._pending: list[asyncio.Future] = []
        self.acknowledged = 0

    async def send(self, event: Event) -> None:
        self._pending.append(await self.producer.send(self.topic, value=event.to_json(), key=event.user_id.encode()))
        if len(self._pending) >= MAX_IN_FLIGHT:
            await self.flush()

    async def flush(self) -> int:
        pending, self._pending = self._pending, []
        await asyncio.gather(*pending)
        self.acknowledged += len(pending)
        return self.acknowledged

    async def __aenter__(self) -> EventSink:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                await self.flush()
        finally:
            await self.producer.stop()
