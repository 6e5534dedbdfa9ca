"""The discipline every Vitrine consumer shares for what it cannot apply, and for Redis being away.

Dead letters: a rejected record goes to the consumer's DLQ topic with its reason, detail and origin
as headers (awaited: never dropped silently). A send is tried `attempts` times — once for an error
the broker calls permanent, such as a record too large for the DLQ once the headers are added; the
retries send each record alone, because the broker refuses a whole Kafka batch for one bad record and
aiokafka does not split it, so an innocent batch-mate gets a batch of its own. A record the DLQ will
not take is appended to a local spill file (JSON lines, fsync'd, with everything a replay needs) and
logged with its coordinates before the caller skips it: a DLQ problem can neither wedge a consumer
(and with it its group's rebalances) nor lose a record.

Redis writes are retried with back-off for as long as Redis is unreachable: pausing is safe,
skipping is not (results and offsets are stored together, so nothing moves until Redis answers).

Used by the feature consumer and the outcome service (`services/*/consumer.py`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import BrokerResponseError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

log = logging.getLogger(__name__)
T = TypeVar("T")
DLQ_DETAIL_MAX = 1000
RETRYABLE = (aioredis.ConnectionError, aioredis.TimeoutError, ConnectionError, OSError)
RETRY_BACKOFF_S = 0.05
"""First back-off step (doubling up to the configured ceiling) for Redis writes and DLQ sends."""


class Rejection(Protocol):
    """Why a record was rejected (e.g. `EventRejected`): a bounded reason and a free-text detail."""

    reason: str
    detail: str


Rejects = Sequence[tuple[ConsumerRecord, Rejection]]


@dataclass(frozen=True, eq=False)
class DlqFailure:
    """A reject the DLQ did not take on the last try."""

    record: ConsumerRecord
    rejected: Rejection
    error: Exception
    alone: bool
    """Whether that try was the record in a Kafka batch of its own."""

    def worth_retrying(self, tries: int, max_tries: int) -> bool:
        if permanent(self.error):
            return not self.alone  # a batch-mate's size error is not this record's: one try alone
        return tries < max_tries


class DeadLetters:
    """Sends rejects to `topic` with bounded retries, spilling what the DLQ will not take."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, attempts: int, backoff_max_s: float, spill_path: Path,
                 on_retry: Callable[[], None], on_spilled: Callable[[str], None]) -> None:
        self.producer = producer
        self.topic = topic
        self.attempts = attempts
        self.backoff_max_s = backoff_max_s
        self.spill_path = spill_path
        self._on_retry = on_retry
        self._on_spilled = on_spilled

    async def send(self, rejects: Rejects) -> None:
        """Every reject is in the DLQ or in the spill file when this returns (a spill failure raises)."""
        failed = await self._send_together(rejects)
        attempt = 1
        while retry := [f for f in failed if f.worth_retrying(attempt, self.attempts)]:
            self._on_retry()
            log.warning("retrying %d DLQ sends after %s: %s (try %d)", len(retry), type(retry[0].error).__name__, retry[0].error, attempt + 1)
            if any(not permanent(f.error) for f in retry):
                await asyncio.sleep(min(RETRY_BACKOFF_S * 2 ** (attempt - 1), self.backoff_max_s))
            failed = [f for f in failed if f not in retry] + await self._send_alone(retry)
            attempt += 1
        if failed:
            await asyncio.to_thread(self._spill, failed)

    @staticmethod
    def headers(record: ConsumerRecord, rejected: Rejection) -> list[tuple[str, bytes]]:
        return [
            ("reason", rejected.reason.encode()),
            ("detail", rejected.detail[:DLQ_DETAIL_MAX].encode()),
            ("source", f"{record.topic}:{record.partition}:{record.offset}".encode()),
        ]

    async def _send(self, record: ConsumerRecord, rejected: Rejection) -> asyncio.Future:
        return await self.producer.send(self.topic, value=record.value or b"", key=record.key, headers=self.headers(record, rejected))

    async def _send_together(self, rejects: Rejects) -> list[DlqFailure]:
        """One try per reject, all in flight together; returns the ones that failed, with their error."""
        failed: list[DlqFailure] = []
        in_flight = []
        for record, rejected in rejects:
            try:
                in_flight.append((record, rejected, await self._send(record, rejected)))
            except Exception as exc:  # noqa: BLE001 - any failure is retried or spilled, never dropped
                failed.append(DlqFailure(record, rejected, exc, alone=False))
        outcomes = await asyncio.gather(*(future for _, _, future in in_flight), return_exceptions=True)
        for (record, rejected, _), outcome in zip(in_flight, outcomes, strict=True):
            if isinstance(outcome, Exception):
                failed.append(DlqFailure(record, rejected, outcome, alone=False))
        return failed

    async def _send_alone(self, retry: Sequence[DlqFailure]) -> list[DlqFailure]:
        """One try per record, each delivered (or failed) before the next is sent: one record per Kafka batch."""
        failed = []
        for f in retry:
            try:
                await (await self._send(f.record, f.rejected))
            except Exception as exc:  # noqa: BLE001 - any failure is retried or spilled, never dropped
                failed.append(DlqFailure(f.record, f.rejected, exc, alone=True))
        return failed

    def _spill(self, failed: Sequence[DlqFailure]) -> None:
        """Append the records to the spill file and fsync it before the batch may skip them.

        A failure here propagates: the batch is not stored, the process ends and is restarted, and the
        records are read again. Each line holds what a replay into the DLQ needs.
        """
        path = self.spill_path
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        lines = [spill_line(f.record, f.error, self.topic, self.headers(f.record, f.rejected)) for f in failed]
        with path.open("ab") as spill:
            spill.write("".join(lines).encode())
            spill.flush()
            os.fsync(spill.fileno())
        if created:
            fsync_dir(path.parent)
        for f in failed:
            self._on_spilled(f.rejected.reason)
            log.error("DLQ refused %s:%d:%d (%s: %s); spilled to %s and skipped",
                      f.record.topic, f.record.partition, f.record.offset, type(f.error).__name__, f.error, path)


async def with_redis_retry(call: Callable[[], Awaitable[T]], backoff_max_s: float, on_retry: Callable[[], None]) -> T:
    """`call()` retried with exponential back-off while Redis is unreachable; other errors propagate."""
    def count(state) -> None:  # noqa: ANN001 - tenacity's RetryCallState
        on_retry()
        log.warning("retrying after %s (attempt %d)", state.outcome.exception(), state.attempt_number)

    retrying = AsyncRetrying(retry=retry_if_exception_type(RETRYABLE), wait=wait_exponential(multiplier=RETRY_BACKOFF_S, max=backoff_max_s),
                             before_sleep=count, reraise=True)
    async for attempt in retrying:
        with attempt:
            return await call()
    raise AssertionError("unreachable")


def permanent(exc: BaseException) -> bool:
    """An error the broker says a retry cannot fix (too large, invalid topic, not authorised)."""
    return isinstance(exc, BrokerResponseError) and not exc.retriable


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def spill_line(record: ConsumerRecord, exc: BaseException, dlq_topic: str, headers: list[tuple[str, bytes]]) -> str:
    entry = {
        "topic": record.topic, "partition": record.partition, "offset": record.offset, "timestamp_ms": record.timestamp,
        "key": _b64(record.key), "value": _b64(record.value),
        "headers": [[name, _b64(value)] for name, value in headers],
        "record_headers": [[name, _b64(value)] for name, value in (record.headers or ())],
        "dlq_topic": dlq_topic, "error": f"{type(exc).__name__}: {exc}", "spilled_at_ms": int(time.time() * 1000),
    }
    return json.dumps(entry, separators=(",", ":")) + "\n"


def fsync_dir(path: Path) -> None:
    """A new file's directory entry is durable only once the directory itself is fsync'd."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
