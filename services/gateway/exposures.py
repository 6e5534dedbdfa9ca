"""The exposure log: every answer to Kafka `recs.served`, off the critical path.

Serving only puts a record into a bounded in-memory buffer (never waits); a background task sends
them. While Kafka is unreachable the buffer fills; once full, new records are dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer

from vitrine.contracts import topics
from vitrine.contracts.exposures import Exposure
from vitrine.services.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)
RETRY_S = 1.0


class ExposureLog:
    def __init__(self, bootstrap_servers: str, capacity: int, metrics: GatewayMetrics, linger_ms: float = 50) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.linger_ms = linger_ms
        self.buffer: asyncio.Queue[Exposure] = asyncio.Queue(maxsize=capacity)
        self.metrics = metrics
        self._task: asyncio.Task | None = None

    def record(self, exposure: Exposure) -> None:
        try:
            self.buffer.put_nowait(exposure)
        except asyncio.QueueFull:
            self.metrics.exposures_dropped.inc()

    def start(self) -> None:
        self._task = asyncio.create_task(self._send_forever())

    async def stop(self, drain_s: float = 2.0) -> None:
        if self._task is None:
            return
        try:
            async with asyncio.timeout(drain_s):
                while not self.buffer.empty():
                    await asyncio.sleep(0.01)
        except TimeoutError:
            pass
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _send_forever(self) -> None:
        while True:
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, linger_ms=self.linger_ms, acks=1)
            try:
                await producer.start()
                while True:
                    exposure = await self.buffer.get()
                    batch = [exposure]
                    while not self.buffer.empty() and len(batch) < 500:
                        batch.append(self.buffer.get_nowait())
                    sends = [await producer.send(topics.RECS_SERVED, value=e.model_dump_json().encode(), key=e.user_id.encode())
                             for e in batch]
                    await asyncio.gather(*sends)
                    self.metrics.exposures_sent.inc(len(batch))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Kafka away: records wait in the buffer (bounded)
                log.warning("exposure log: %s; retrying in %.0fs", exc, RETRY_S)
                await asyncio.sleep(RETRY_S)
            finally:
                await asyncio.shield(producer.stop())
