"""An asyncio micro-batcher: concurrent requests for one model become one Triton call.

Modelled on ray's serve/batching.py: a bounded queue, one future per request, an event that says
"a batch is full", and errors fanned out to every request of the failed batch. Policy:
- idle (no batch in flight, nothing queued): the request goes out at once from its own task;
- busy: collect until the batch is full or the oldest request has waited `max_delay_s`;
- at most `max_inflight` batches at Triton at a time; a full queue raises `QueueFull` at submit, so
  that the caller can shed load (a degraded answer) instead of queueing without bound;
- deadlines are per request: a caller waits at most until its own deadline (then `DeadlineExpired`,
  and its row is skipped if not yet sent), members already expired when their batch leaves are
  answered `DeadlineExpired` without being sent, and the batch's timeout is the *latest* deadline of
  its members — one client's 2 ms deadline must not cut short the call for everybody batched with it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Row = TypeVar("Row")
Result = TypeVar("Result")


class QueueFull(RuntimeError):
    """The batcher's queue is at capacity: shed this request."""


class DeadlineExpired(TimeoutError):
    """The request's own deadline passed before its answer arrived."""


@dataclass
class _Pending(Generic[Row, Result]):
    row: Row
    deadline: float | None
    future: asyncio.Future[Result]
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[Row, Result]):
    def __init__(
        self,
        infer: Callable[[Sequence[Row], float | None], Awaitable[Sequence[Result]]],
        max_batch: int,
        max_delay_s: float,
        queue_size: int,
        max_inflight: int,
        on_batch: Callable[[int, list[float]], None] | None = None,
    ) -> None:
        """`infer(rows, timeout_s)` answers one batch in order (`timeout_s` None: a member has no deadline);
        `on_batch(size, queue_waits_s)` observes each batch sent."""
        self._infer = infer
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self._queue: asyncio.Queue[_Pending[Row, Result]] = asyncio.Queue(maxsize=queue_size)
        self._full = asyncio.Event()
        self._slots = asyncio.Semaphore(max_inflight)
        self._inflight = 0
        self._on_batch = on_batch
        self._loop_task: asyncio.Task | None = None
        self._batches: set[asyncio.Task] = set()

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop batching: batches in flight finish, requests still queued are cancelled."""
        if self._loop_task:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        await asyncio.gather(*self._batches, return_exceptions=True)
        while not self._queue.empty():
            self._queue.get_nowait().future.cancel()

    async def submit(self, row: Row, deadline: float | None = None) -> Result:
        """Queue one row and wait for its result; `deadline` is a perf_counter() instant."""
        pending: _Pending[Row, Result] = _Pending(row, deadline, asyncio.get_running_loop().create_future())
        if self._inflight == 0 and self._queue.empty():
            # Idle: a batch of one, sent from the caller's own task — no hand-over to the batching loop
            # and back (two event-loop turns and a task), which is most of a lone request's batching cost.
            await self._slots.acquire()  # free while nothing is in flight: does not yield
            self._inflight += 1
            await self._send([pending])
            return pending.future.result()
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull as exc:
            raise QueueFull(f"{self._queue.maxsize} requests already queued") from exc
        if self._queue.qsize() >= self.max_batch:
            self._full.set()
        if deadline is None:
            return await pending.future
        try:
            # wait_for cancels the future on timeout: a row not yet sent is then skipped by `_send`.
            return await asyncio.wait_for(pending.future, max(0.0, deadline - time.perf_counter()))
        except TimeoutError as exc:
            if pending.future.done() and not pending.future.cancelled():
                return pending.future.result()  # answered in the same loop turn as the timeout
            raise DeadlineExpired("the request's deadline passed while it waited for its batch") from exc

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            try:
                if self._inflight > 0 and self.max_batch > 1:
                    remaining = first.enqueued + self.max_delay_s - time.perf_counter()
                    if remaining > 0 and self._queue.qsize() < self.max_batch - 1:
                        self._full.clear()
                        try:
                            await asyncio.wait_for(self._full.wait(), remaining)
                        except TimeoutError:
                            pass
                while len(batch) < self.max_batch and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                self._full.clear()
                await self._slots.acquire()
            except asyncio.CancelledError:
                for p in batch:  # taken from the queue but not sent: stopping must not strand them
                    p.future.cancel()
                raise
            self._inflight += 1
            task = asyncio.create_task(self._send(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _send(self, batch: list[_Pending[Row, Result]]) -> None:
        try:
            now = time.perf_counter()
            live = []
            for p in batch:
                if p.future.done():
                    continue  # the caller gave up: no answer needed
                if p.deadline is not None and p.deadline <= now:
                    p.future.set_exception(DeadlineExpired("the request's deadline passed before its batch was sent"))
                else:
                    live.append(p)
            if not live:
                return
            if self._on_batch:
                self._on_batch(len(live), [now - p.enqueued for p in live])
            # The latest deadline: each member still stops waiting at its own (see `submit`).
            timeout = None if any(p.deadline is None for p in live) else max(p.deadline for p in live) - now
            try:
                results = await self._infer([p.row for p in live], timeout)
            except Exception as exc:  # noqa: BLE001 - fanned out: every caller decides how to degrade
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                return
            for p, result in zip(live, results, strict=True):
                if not p.future.done():
                    p.future.set_result(result)
        finally:
            self._inflight -= 1
            self._slots.release()
