"""A circuit breaker for the gateway's Triton calls, with outcomes the caller classifies.

Why not purgatory (used before): its breaker counts every exception raised inside `async with` —
including a gRPC cancellation when a storefront gives up, and a timeout that only expired because one
client sent a 2 ms deadline — and its half-open state admits *all* traffic at once. One impatient
client could then open the circuit for every shopper (issue 12.3). Here:

- the caller reports each call's outcome: `success()`, `failure()` (Triton's own fault: unreachable,
  an internal error, or no answer within a budget it should have met) or nothing at all (`neutral`,
  e.g. the client's own short deadline or a cancellation), which leaves the state untouched;
- `threshold` consecutive failures open the circuit for `reset_s`;
- then half-open admits at most `probes` trial calls at a time; one success closes the circuit, one
  failure re-opens it; everybody else is refused (`CircuitOpen`) until the trial decides.

The states follow Nygard, *Release It!* (2nd ed.), ch. 5 "Circuit Breaker".
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from types import TracebackType


class CircuitOpen(RuntimeError):
    """The circuit is open (or half-open with every trial slot taken): do not call, degrade."""


class BreakerState(enum.IntEnum):
    """Values of the state gauge: 0 closed, 1 half-open, 2 open."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(self, threshold: int, reset_s: float, probes: int,
                 on_state: Callable[[BreakerState], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.reset_s = reset_s
        self.probes = probes
        self._on_state = on_state
        self._clock = clock
        self.state = BreakerState.CLOSED
        self.failures = 0
        self._opened_at = 0.0
        self._trials = 0
        if on_state:
            on_state(self.state)

    def _set(self, state: BreakerState) -> None:
        if state is not self.state:
            self.state = state
            if self._on_state:
                self._on_state(state)

    def call(self) -> _Call:
        """Admit one call or raise `CircuitOpen`; use as `with breaker.call() as outcome: ...`."""
        if self.state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self.reset_s:
                raise CircuitOpen("the Triton circuit is open")
            self._set(BreakerState.HALF_OPEN)
            self._trials = 0
        trial = self.state is BreakerState.HALF_OPEN
        if trial:
            if self._trials >= self.probes:
                raise CircuitOpen("the Triton circuit is half-open and its trial calls are under way")
            self._trials += 1
        return _Call(self, trial)

    def _finish(self, trial: bool, outcome: str) -> None:
        if trial:
            self._trials -= 1
        if outcome == "success":
            self.failures = 0
            self._set(BreakerState.CLOSED)
        elif outcome == "failure":
            self.failures += 1
            if trial or (self.state is BreakerState.CLOSED and self.failures >= self.threshold):
                self._opened_at = self._clock()
                self._set(BreakerState.OPEN)
        # "neutral": the call says nothing about Triton's health; a trial slot is simply freed.


class _Call:
    """One admitted call. Its outcome is `neutral` unless the caller says otherwise; an exception
    that escapes the block without a verdict is neutral too (the caller classifies Triton's errors)."""

    def __init__(self, breaker: CircuitBreaker, trial: bool) -> None:
        self._breaker = breaker
        self._trial = trial
        self.outcome = "neutral"

    def success(self) -> None:
        self.outcome = "success"

    def failure(self) -> None:
        self.outcome = "failure"

    def __enter__(self) -> _Call:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._breaker._finish(self._trial, self.outcome)
