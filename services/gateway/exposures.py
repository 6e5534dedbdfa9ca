"""The exposure log: every answer to Kafka `recs.served`, off the critical path.

Serving only puts a record into a bounded in-memory buffer (never waits); a background task sends
them in batches of at most `BATCH`. A batch taken from the buffer is held (`unsent`) until Kafka
acknowledges each record: on a Kafka error the records not acknowledged stay held and are sent again
once the producer reconnects — never dropped. While they are held the buffer fills; once it is full,
new records are dropped and counted (`reason="buffer_full"`); records still held when the gateway stops
(after a short drain) are counted too (`reason="shutdown"`). So at every moment

    answers delivered = exposures sent + exposures dropped + exposures buffered (buffer + held batch),

which `vitrine_gateway_answers_total`, `…_exposures_sent_total`, `…_exposures_dropped_total` and
`…_exposures_buffered_records` show. A record whose acknowledgement was lost may reach the topic twice;
the outcome service and the archive deduplicate by `request_id`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from aiokafka import AIOKafkaProducer

from vitrine.contracts import topics
from vitrine.contracts.exposures import Exposure
from vitrine.services.gateway.metrics import DROPPED_BUFFER_FULL, DROPPED_SHUTDOWN, GatewayMetrics

log = logging.getLogger(__name__)
RETRY_S = 1.0
BATCH: Final = 500
"""Most records taken from the buffer per send."""


class ExposureLog:
    def __init__(self, bootstrap_servers: str, capacity: int, metrics: GatewayMetrics, linger_ms: float = 50,
                 send_timeout_ms: int = 10_000, topic: str = topics.RECS_SERVED,
                 producer_factory: Callable[..., AIOKafkaProducer] = AIOKafkaProducer) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.linger_ms = linger_ms
        self.send_timeout_ms = send_timeout_ms
        self.topic = topic
        self.producer_factory = producer_factory
        self.buffer: asyncio.Queue[Exposure] = asyncio.Queue(maxsize=capacity)
        self.unsent: list[Exposure] = []
        """Taken from the buffer, not yet acknowledged by Kafka: sent again after a failure."""
        self.metrics = metrics
        metrics.exposures_buffered.set_function(lambda: self.buffer.qsize() + len(self.unsent))
        self._task: asyncio.Task | None = None

    def record(self, exposure: Exposure) -> None:
        try:
            self.buffer.put_nowait(exposure)
        except asyncio.QueueFull:
            self.metrics.exposures_dropped.labels(DROPPED_BUFFER_FULL).inc()

    def start(self) -> None:
        self._task = asyncio.create_task(self._send_forever())

    async def stop(self, drain_s: float = 2.0) -> None:
        if self._task is None:
            return
        try:
            async with asyncio.timeout(drain_s):
                while not self.buffer.empty() or self.unsent:
                    await asyncio.sleep(0.01)
        except TimeoutError:
            pass
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        left = self.buffer.qsize() + len(self.unsent)
        if left:
            log.warning("exposure log: %d records not sent at shutdown (Kafka away?), counted as dropped", left)
            self.metrics.exposures_dropped.labels(DROPPED_SHUTDOWN).inc(left)
            self.unsent = []
            while not self.buffer.empty():
                self.buffer.get_nowait()

    async def _send_forever(self) -> None:
        while True:
            producer = self.producer_factory(bootstrap_servers=self.bootstrap_servers, linger_ms=self.linger_ms, acks=1,
                                        request_timeout_ms=self.send_timeout_ms)
            try:
                await producer.start()
                while True:
                    if not self.unsent:
                        self.unsent = [await self.buffer.get()]
                        while not self.buffer.empty() and len(self.unsent) < BATCH:
                            self.unsent.append(self.buffer.get_nowait())
                    await self._send(producer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Kafka away: the held batch is sent again, the rest waits in the buffer
                log.warning("exposure log: %s; %d records held, retrying in %.0fs", exc, len(self.unsent), RETRY_S)
                await asyncio.sleep(RETRY_S)
            finally:
                await asyncio.shield(producer.stop())

    async def _send(self, producer: AIOKafkaProducer) -> None:
        """Send the held batch; count what Kafka acknowledged, keep the rest held and raise the first error."""
        futures: list[asyncio.Future] = []
        error: Exception | None = None
        for exposure in self.unsent:
            try:
                futures.append(await producer.send(self.topic, value=exposure.model_dump_json().encode(), key=exposure.user_id.encode()))
            except Exception as exc:  # noqa: BLE001 - the records before it are in flight: wait for them below
                error = exc
                break
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        acknowledged = {i for i, outcome in enumerate(outcomes) if not isinstance(outcome, BaseException)}
        self.metrics.exposures_sent.inc(len(acknowledged))
        self.unsent = [x for i, x in enumerate(self.unsent) if i not in acknowledged]
        error = error or next((o for o in outcomes if isinstance(o, Exception)), None)
        if error is not None:
            raise error
