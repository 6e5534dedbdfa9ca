"""Where a lone request's time goes: each hop of the gateway's path timed on its own, one call at a time.

Closed loop on purpose (service time, no queueing): a direct Triton call, a gateway Recommend for a
shopper with history (features → model → answer), a bare gRPC round trip to the gateway (its health
check: the hop every request pays), the gateway's Redis read, and a Redis PING. The gateway's own
per-stage means over the same calls come from its histogram (`vitrine_gateway_stage_duration_seconds`).

    python -m vitrine.loadtest.hop_latency --calls 1000
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
import redis.asyncio as aioredis
import tritonclient.grpc.aio as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vitrine.export.triton_repository import versions
from vitrine.loadtest import scrape
from vitrine.loadtest.arguments import bounded_int
from vitrine.loadtest.serving_bench import STOREFRONT_KEY, prepare_users, triton_sender
from vitrine.services.features.store import FeatureStore
from vitrine.services.gateway.client import GatewayClient
from vitrine.services.gateway.metrics import STAGE_DURATION
from vitrine.services.gateway.ranking import ServedModel
from vitrine.settings import Settings


async def _time(call: Callable[[], Awaitable[object]], calls: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        await call()
    samples = np.empty(calls)
    for n in range(calls):
        started = time.perf_counter()
        await call()
        samples[n] = time.perf_counter() - started
    return samples * 1000


async def _stages(settings: Settings) -> dict[str, tuple[float, float]]:
    """stage → (sum seconds, count) from the gateway's metrics."""
    cfg = settings.gateway
    return scrape.histogram_totals(await scrape.fetch(cfg.metrics_host, cfg.metrics_port), STAGE_DURATION, by="stage")


async def measure(settings: Settings, calls: int, warmup: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    model = ServedModel.load(settings.triton.model_repository, "gru4rec", str(versions(settings.triton.model_repository / "gru4rec")[-1]))
    users = await prepare_users(settings, 50)
    redis = aioredis.Redis(host=settings.redis.host, port=settings.redis.port)
    store = FeatureStore(redis, settings.features)
    direct = triton.InferenceServerClient(settings.triton.grpc_url)
    channel = grpc.aio.insecure_channel(settings.gateway.address)
    health = health_pb2_grpc.HealthStub(channel)
    counter = iter(range(10**9))
    send_direct = triton_sender(direct, model, settings.gateway.exclude_width, 0)
    try:
        async with GatewayClient(settings.gateway.address, STOREFRONT_KEY) as gateway:
            async def recommend() -> object:
                return await gateway.recommend(users[next(counter) % len(users)], k=10, page="home", timeout_s=1)

            async def features() -> object:
                return await store.user_features(users[next(counter) % len(users)], int(time.time() * 1000))

            results = {"direct Triton call": await _time(lambda: send_direct(0), calls, warmup)}
            before = await _stages(settings)
            results["gateway Recommend"] = await _time(recommend, calls, warmup)
            after = await _stages(settings)
            results["gRPC round trip to the gateway (health check)"] = await _time(
                lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=1), calls, warmup)
            results["Redis: one user's features"] = await _time(features, calls, warmup)
            results["Redis: PING"] = await _time(redis.ping, calls, warmup)
    finally:
        await channel.close()
        await direct.close()
        await redis.aclose()
    stages = {stage: 1000 * (after[stage][0] - before.get(stage, (0, 0))[0]) / max(after[stage][1] - before.get(stage, (0, 0))[1], 1)
              for stage in after}
    return results, stages


def render(results: dict[str, np.ndarray], stages: dict[str, float]) -> str:
    lines = ["| one call at a time | p50 ms | p90 ms | p99 ms |", "| --- | ---: | ---: | ---: |"]
    for label, samples in results.items():
        p50, p90, p99 = np.percentile(samples, [50, 90, 99])
        lines.append(f"| {label} | {p50:.3f} | {p90:.3f} | {p99:.3f} |")
    lines += ["", "| gateway stage (mean over the Recommend calls above) | ms |", "| --- | ---: |"]
    lines += [f"| {stage} | {value:.3f} |" for stage, value in stages.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=bounded_int(10, 100_000), default=1000, help="timed calls per hop")
    parser.add_argument("--warmup", type=bounded_int(0, 10_000), default=100, help="untimed calls first")
    args = parser.parse_args()
    results, stages = asyncio.run(measure(Settings(), args.calls, args.warmup))
    print(render(results, stages))


if __name__ == "__main__":
    main()
