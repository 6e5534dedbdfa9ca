"""An open-loop load generator: requests leave at a target rate whatever the server does.

Request n is due at start + t_n (constant spacing or Poisson arrivals); it is launched as its own task
at that time, never held back by slow earlier answers, and its latency is measured from its *due*
time, not from when it actually left — so that a stalled server shows up in the percentiles instead
of silently slowing the load down (coordinated omission). The generator reports how far behind its
own schedule it fell; above a few milliseconds the figures describe the client, not the server.
Percentiles come from every sample (numpy), never from pre-bucketed histograms.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Arrivals = Literal["constant", "poisson"]
BEHIND_LIMIT_S = 0.005


@dataclass(frozen=True)
class Outcome:
    code: str = "OK"
    degraded: bool = False
    variant: str = ""


@dataclass
class LoadResult:
    target_rate: float
    duration_s: float
    latencies_s: np.ndarray
    codes: Counter
    degraded: int
    by_variant: dict[str, np.ndarray]
    behind_s: np.ndarray
    timeline: np.ndarray = field(repr=False)
    """Due time (s since start) of every measured request, aligned with latencies_s."""
    launched: int = 0
    """Requests sent in all, warm-up included (what the servers really handled)."""

    @property
    def sent(self) -> int:
        return int(sum(self.codes.values()))

    @property
    def achieved_rate(self) -> float:
        return self.sent / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def errors(self) -> int:
        return self.sent - self.codes.get("OK", 0)

    def percentile_ms(self, q: float, samples: np.ndarray | None = None) -> float:
        data = self.latencies_s if samples is None else samples
        return float(np.percentile(data, q) * 1000) if len(data) else float("nan")

    @property
    def fell_behind(self) -> bool:
        """More than 1 % of requests left more than 5 ms after they were due."""
        return bool(len(self.behind_s)) and float(np.mean(self.behind_s > BEHIND_LIMIT_S)) > 0.01

    def summary(self) -> dict[str, object]:
        return {
            "target_rate": self.target_rate, "achieved_rate": round(self.achieved_rate, 1), "sent": self.sent,
            "p50_ms": self.percentile_ms(50), "p90_ms": self.percentile_ms(90), "p99_ms": self.percentile_ms(99),
            "p999_ms": self.percentile_ms(99.9), "errors": {k: v for k, v in self.codes.items() if k != "OK"},
            "degraded_share": self.degraded / self.sent if self.sent else 0.0,
            "per_variant": {v: {"p50_ms": self.percentile_ms(50, s), "p99_ms": self.percentile_ms(99, s), "n": len(s)}
                            for v, s in sorted(self.by_variant.items())},
            "generator_fell_behind": self.fell_behind, "max_behind_ms": float(self.behind_s.max() * 1000) if len(self.behind_s) else 0.0,
        }


def schedule(rate: float, duration_s: float, arrivals: Arrivals, seed: int) -> np.ndarray:
    """Due times (seconds from start) of every request in [0, duration_s)."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be positive")
    if arrivals == "constant":
        return np.arange(0, duration_s, 1 / rate)
    # A Poisson process conditioned on its count: round(rate × duration) instants, uniform and sorted (gaps
    # still exponential). Drawing the count too would offer ±5 % of the target by chance (1 σ at 400
    # requests), and a capacity step would pass or fail on the draw instead of on the server.
    count = max(1, round(rate * duration_s))
    return np.sort(np.random.default_rng(seed).uniform(0, duration_s, size=count))


async def run(
    send: Callable[[int], Awaitable[Outcome]],
    rate: float,
    duration_s: float,
    warmup_s: float = 1.0,
    arrivals: Arrivals = "constant",
    seed: int = 0,
    max_outstanding: int = 10_000,
) -> LoadResult:
    """Drive `send(n)` open-loop; requests due during the first `warmup_s` are sent but not measured.

    `send` must bound its own time (a deadline); an exception counts as code "EXCEPTION". When
    `max_outstanding` requests are in flight, a due request is counted as "CLIENT_OVERLOAD" instead
    of being sent, so the generator never turns closed-loop without saying so.
    """
    # Warm-up and measured window scheduled apart, so the measured window offers exactly rate × duration_s.
    due = schedule(rate, duration_s, arrivals, seed) + warmup_s
    if warmup_s > 0:
        due = np.concatenate([schedule(rate, warmup_s, arrivals, seed + 1), due])
    latencies = np.full(len(due), np.nan)
    behind = np.zeros(len(due))
    outcomes: list[Outcome | None] = [None] * len(due)
    outstanding = 0
    tasks: set[asyncio.Task] = set()
    start = time.perf_counter()

    async def one(n: int, due_at: float) -> None:
        nonlocal outstanding
        try:
            outcomes[n] = await send(n)
        except Exception as exc:  # noqa: BLE001 - counted, never fatal for the run
            outcomes[n] = Outcome(code=getattr(getattr(exc, "code", lambda: None)(), "name", None) or "EXCEPTION")
        finally:
            latencies[n] = time.perf_counter() - due_at
            outstanding -= 1

    for n, offset in enumerate(due):
        due_at = start + offset
        delay = due_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        behind[n] = max(0.0, time.perf_counter() - due_at)
        if outstanding >= max_outstanding:
            outcomes[n] = Outcome(code="CLIENT_OVERLOAD")
            latencies[n] = np.nan
            continue
        outstanding += 1
        task = asyncio.create_task(one(n, due_at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    measured = due >= warmup_s
    codes = Counter(o.code for o, m in zip(outcomes, measured, strict=True) if m and o is not None)
    ok = measured & ~np.isnan(latencies)
    by_variant: dict[str, list[float]] = {}
    for n in np.flatnonzero(ok):
        outcome = outcomes[n]
        if outcome is not None and outcome.variant:
            by_variant.setdefault(outcome.variant, []).append(latencies[n])
    return LoadResult(
        target_rate=rate, duration_s=duration_s, latencies_s=latencies[ok], codes=codes,
        degraded=sum(1 for o, m in zip(outcomes, measured, strict=True) if m and o is not None and o.degraded),
        by_variant={v: np.array(s) for v, s in by_variant.items()}, behind_s=behind[measured], timeline=due[ok] - warmup_s,
        launched=sum(1 for o in outcomes if o is not None and o.code != "CLIENT_OVERLOAD"),
    )


@dataclass
class RampStep:
    """One rate of a ramp, measured `repeats` times; judged by the majority, so one disturbed run cannot decide it."""

    rate: float
    runs: list[LoadResult]
    meets: bool
    client_bound: bool
    """The generator fell behind its schedule in most runs of a failing step: the client, not the server, may be the limit."""

    @property
    def p99_ms(self) -> float:
        """Median of the runs' p99s."""
        return float(np.median([r.percentile_ms(99) for r in self.runs]))

    def summary(self) -> dict[str, object]:
        return {"rate": self.rate, "meets": self.meets, "client_bound": self.client_bound, "p99_ms_median": self.p99_ms,
                "p99_ms_runs": [r.percentile_ms(99) for r in self.runs], "runs": [r.summary() for r in self.runs]}


@dataclass
class Ramp:
    highest_rate: float
    steps: list[RampStep]

    @property
    def client_bound(self) -> bool:
        """The lowest failing rate failed with the generator behind: the figure is a lower bound on the server."""
        failing = [s for s in self.steps if not s.meets]
        return bool(failing) and min(failing, key=lambda s: s.rate).client_bound

    def summary(self) -> dict[str, object]:
        return {"highest_rate": self.highest_rate, "client_bound": self.client_bound, "steps": [s.summary() for s in self.steps]}


def meets_slo(result: LoadResult, slo_p99_ms: float) -> bool:
    """No errors, at least 95 % of the target rate achieved, p99 within the SLO."""
    return result.errors == 0 and result.achieved_rate >= 0.95 * result.target_rate and result.percentile_ms(99) <= slo_p99_ms


async def measure_step(measure: Callable[[float], Awaitable[LoadResult]], rate: float, slo_p99_ms: float, repeats: int) -> RampStep:
    """Run `rate` until a majority of `repeats` runs agrees (two of three, usually)."""
    needed = repeats // 2 + 1
    runs: list[LoadResult] = []
    good = bad = 0
    while good < needed and bad < needed:
        result = await measure(rate)
        runs.append(result)
        if meets_slo(result, slo_p99_ms):
            good += 1
        else:
            bad += 1
    meets = good >= needed
    behind = sum(r.fell_behind for r in runs)
    return RampStep(rate, runs, meets, client_bound=not meets and behind * 2 > len(runs))


async def highest_rate(
    measure: Callable[[float], Awaitable[LoadResult]], slo_p99_ms: float, start_rate: float, factor: float = 1.5,
    max_rate: float = 20_000, refine_steps: int = 3, repeats: int = 3,
) -> Ramp:
    """Ramp the rate geometrically, then bisect: the highest rate whose runs mostly meet the SLO (`meets_slo`).

    Every step is measured up to `repeats` times and decided by the majority. A failing step where the
    generator fell behind is still a failing step, but the ramp says so (`Ramp.client_bound`).
    """
    steps: list[RampStep] = []
    good, bad = 0.0, None
    rate = start_rate
    while rate <= max_rate:
        step = await measure_step(measure, rate, slo_p99_ms, repeats)
        steps.append(step)
        if not step.meets:
            bad = rate
            break
        good = rate
        rate *= factor
    if bad is not None:
        low, high = good, bad
        for _ in range(refine_steps):
            mid = (low + high) / 2
            step = await measure_step(measure, mid, slo_p99_ms, repeats)
            steps.append(step)
            low, high = (mid, high) if step.meets else (low, mid)
        good = low
    return Ramp(good, steps)
