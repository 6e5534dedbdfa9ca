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
    # The first 10 requests are held until the schedule (100 requests due in [0, 0.495 s]) is over. The
    # release is a timer due after the last request's, and the generator sends every overdue request
    # without yielding, so however late the loop runs, the release comes after the last due request was
    # handled: exactly 10 sent, 90 counted, no timing margin.
    release = asyncio.Event()
    in_flight = most_in_flight = 0

    async def release_after_the_schedule() -> None:
        await asyncio.sleep(0.5 + 0.1)
        release.set()

    async def held(n: int) -> lg.Outcome:
        nonlocal in_flight, most_in_flight
        if n == 0:  # `run` has taken its start time: the timer is due after every request
            releaser.append(asyncio.create_task(release_after_the_schedule()))
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        await release.wait()
        in_flight -= 1
        return lg.Outcome()

    releaser: list[asyncio.Task] = []
    result = await lg.run(held, rate=200, duration_s=0.5, warmup_s=0.0, max_outstanding=10)
    await asyncio.gather(*releaser)
    assert result.codes == {"OK": 10, "CLIENT_OVERLOAD": 90} and most_in_flight == 10 and result.launched == 10


def _synthetic(rate: float, p99_s: float, behind_s: float = 0.0) -> lg.LoadResult:
    return lg.LoadResult(rate, 1.0, np.full(100, p99_s), lg.Counter({"OK": int(rate)}), 0, {}, np.full(100, behind_s), np.zeros(100))


@pytest.mark.timeout(30)
async def test_ramp_finds_the_highest_rate_under_the_slo() -> None:
    async def model(rate: float) -> lg.LoadResult:
        return _synthetic(rate, 0.025 * rate / 1000)  # p99 grows with load and crosses 25 ms at 1,000 req/s

    ramp = await lg.highest_rate(model, slo_p99_ms=25, start_rate=100, factor=2, refine_steps=5)
    assert 900 <= ramp.highest_rate <= 1000 and len(ramp.steps) >= 5
    assert not ramp.client_bound
    # Runs that agree decide a step: two of three, the third is not needed.
    assert all(len(step.runs) == 2 for step in ramp.steps)


@pytest.mark.timeout(30)
async def test_one_disturbed_run_does_not_decide_a_step() -> None:
    calls: list[float] = []

    async def hiccup(rate: float) -> lg.LoadResult:
        calls.append(rate)
        first_at_this_rate = calls.count(rate) == 1
        return _synthetic(rate, 0.100 if first_at_this_rate else 0.005)  # every rate's first run hits a pause

    step = await lg.measure_step(hiccup, 200, slo_p99_ms=25, repeats=3)
    assert step.meets and len(step.runs) == 3 and step.p99_ms == pytest.approx(5)


@pytest.mark.timeout(30)
async def test_a_ramp_that_fails_with_the_generator_behind_says_it_is_client_bound() -> None:
    async def client_limited(rate: float) -> lg.LoadResult:
        # Above 400 req/s the generator cannot keep its schedule and the measured tail grows.
        return _synthetic(rate, 0.005 if rate <= 400 else 0.040, behind_s=0.0 if rate <= 400 else 0.010)

    ramp = await lg.highest_rate(client_limited, slo_p99_ms=25, start_rate=100, factor=2, refine_steps=2)
    assert ramp.highest_rate == 400 and ramp.client_bound
    assert ramp.summary()["client_bound"] is True


def test_bad_schedules_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        lg.schedule(0, 1, "constant", 0)
