import httpx
import pytest

from tests.integration.invariants import eventually
from vitrine.services.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


@pytest.mark.asyncio
@pytest.mark.parametrize("job", ["prometheus", "redis", "triton", "archive", "triggers", "rollouts"])
async def test_scrapes_each_target(stack: Stack, job: str) -> None:
    url = f"{stack.settings.prometheus.url}/api/v1/query"

    async def up() -> float | None:
        async with httpx.AsyncClient(timeout=5) as client:
            body = (await client.get(url, params={"query": f'up{{job="{job}"}}'})).json()
        results = body["data"]["result"]
        return float(results[0]["value"][1]) if results else None

    assert await eventually(up, timeout_s=30, what=f"a scrape of {job}") == 1.0


@pytest.mark.asyncio
async def test_scraped_series_carry_the_targets_own_metrics(stack: Stack) -> None:
    url = f"{stack.settings.prometheus.url}/api/v1/query"

    async def series() -> dict | None:
        async with httpx.AsyncClient(timeout=5) as client:
            body = (await client.get(url, params={"query": "redis_up or nv_inference_count"})).json()
        names = {r["metric"]["__name__"] for r in body["data"]["result"]}
        return names if {"redis_up", "nv_inference_count"} <= names else None

    await eventually(series, timeout_s=30, what="redis_up and nv_inference_count in Prometheus")
