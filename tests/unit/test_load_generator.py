"""The open-loop load generator against fake senders (no server): what it measures, and what it refuses to hide."""

import asyncio

import numpy as np
import pytest

from vitrine.loadtest import load_generator as lg


@pytest.mark.timeout(30)
async def test_a_stalled_server_shows_in_the_latencies_instead_of_slowing_the_load() -> None:
    gate = asyncio.Lock()

    async def stalled(n: int) -> lg.Outcome:
        async with gate:  # one at a time, 20 ms each: at 200 req/s the queue grows
            await asyncio.sleep(0.02)
        return lg.Outcome()

    result = await lg.run(stalled, rate=200, duration_s=1.0, warmup_s=0.0)
    assert result.sent == 200  # every request left on schedule
    # Closed-loop measurement would report ~20 ms; from the due time the backlog is visible.
    assert result.percentile_ms(99) > 1000 and result.percentile_ms(50) > 500
    late = result.latencies_s[np.argsort(result.timeline)]
    assert late[-10:].mean() > late[:10].mean() * 5


@pytest.mark.timeout(30)
async def test_poisson_arrivals_have_the_target_mean_rate() -> None:
    times = lg.schedule(500, 20, "poisson", seed=3)
    assert abs(len(times) / 20 - 500) < 25
    gaps = np.diff(times)
    assert abs(gaps.std() / gaps.mean() - 1) < 0.1  # exponential gaps: coefficient of variation 1


@pytest.mark.timeout(30)
async def test_errors_are_counted_by_code_and_warmup_is_not_measured() -> None:
    class Failed(Exception):
        def code(self):  # noqa: ANN201 - mimics grpc.aio.AioRpcError
            return type("Code", (), {"name": "UNAVAILABLE"})()

    async def flaky(n: int) -> lg.Outcome:
        if n % 4 == 0:
            raise Failed()
        return lg.Outcome(degraded=n % 4 == 1, variant="a" if n % 2 else "b")

    result = await lg.run(flaky, rate=400, duration_s=0.5, warmup_s=0.25)
    assert 180 <= result.sent <= 220
    assert result.codes["UNAVAILABLE"] == pytest.approx(result.sent / 4, abs=2)
    assert 0.2 < result.degraded / result.sent < 0.3
    assert set(result.by_variant) == {"a", "b"}


@pytest.mark.timeout(30)
async def test_too_many_outstanding_requests_are_reported_not_skipped() -> None:
    async def never(n: int) -> lg.Outcome:
        await asyncio.sleep(0.5)
        return lg.Outcome()

    result = await lg.run(never, rate=200, duration_s=0.5, warmup_s=0.0, max_outstanding=10)
    assert result.codes["CLIENT_OVERLOAD"] >= 80 and result.codes["OK"] == 10


@pytest.mark.timeout(30)
async def test_ramp_finds_the_highest_rate_under_the_slo() -> None:
    async def model(rate: float) -> lg.LoadResult:
        # Synthetic server: p99 grows with load and crosses 25 ms at 1,000 req/s.
        p99 = 0.025 * rate / 1000
        samples = np.full(100, p99)
        return lg.LoadResult(rate, 1.0, samples, lg.Counter({"OK": int(rate)}), 0, {}, np.zeros(100), np.zeros(100))

    best, runs = await lg.highest_rate(model, slo_p99_ms=25, start_rate=100, factor=2, refine_steps=5)
    assert 900 <= best <= 1000 and len(runs) >= 5


def test_bad_schedules_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        lg.schedule(0, 1, "constant", 0)
