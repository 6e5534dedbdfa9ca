"""Open-loop load on the gateway while Redis is stopped and started again: which requests miss their
deadline, and in which stage the time went (issue 12.5).

    python -m vitrine.loadtest.redis_restart --rate 100 --duration 20 --down-at 5 --up-at 10

Prints the answers by status code, the degraded share, the late answers (latency above the 1 s
deadline) and, from the gateway's own histograms scraped before and after, the time per stage. The
stack described by the current settings must be up; Redis is restarted through its supervisor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import numpy as np

from vitrine.contracts import topics
from vitrine.contracts.events import Event, EventType
from vitrine.loadtest import scrape
from vitrine.loadtest.load_generator import run
from vitrine.loadtest.serving_bench import DEADLINE_S, STOREFRONT_KEY, gateway_sender
from vitrine.services.events.publisher import publish
from vitrine.services.gateway.client import GatewayClient
from vitrine.services.gateway.metrics import STAGE_DURATION
from vitrine.services.stack import Stack
from vitrine.settings import Settings


async def measure(settings: Settings, rate: float, duration_s: float, down_at_s: float, up_at_s: float) -> dict:
    stack = Stack(settings)
    gateway = settings.gateway
    before = await scrape.fetch(gateway.metrics_host, gateway.metrics_port)
    users = [f"rr-user-{n}" for n in range(200)]
    now_ms = int(time.time() * 1000)
    await publish([Event(event_id=f"{u}-{k}", user_id=u, item_id=f"i{(n * 7 + k) % 500}", type=EventType.VIEW, ts_ms=now_ms + k)
                   for n, u in enumerate(users) for k in range(3)], settings.kafka.bootstrap_servers, topics.EVENTS, retime=False)
    async with GatewayClient(gateway.address, STOREFRONT_KEY) as client:  # warm shoppers: the model path is exercised
        for _ in range(100):
            if (await client.recommend(users[-1], k=3)).model_name not in ("trending", "popularity"):
                break
            await asyncio.sleep(0.1)

    async def outage() -> tuple[float, float]:
        await asyncio.sleep(down_at_s)
        stopped = time.perf_counter()
        await asyncio.to_thread(stack.supervisor.rpc_stop, "redis")
        await asyncio.sleep(max(0.0, up_at_s - down_at_s))
        await stack.up(report=lambda line: None)
        return stopped, time.perf_counter()

    async with GatewayClient(gateway.address, STOREFRONT_KEY) as client:
        restart = asyncio.create_task(outage())
        result = await run(gateway_sender(client, lambda n: (users[n % len(users)], "home")), rate, duration_s, warmup_s=0.0)
        await restart
    after = await scrape.fetch(gateway.metrics_host, gateway.metrics_port)
    stages_before = scrape.histogram_totals(before, STAGE_DURATION, by="stage")
    stages_after = scrape.histogram_totals(after, STAGE_DURATION, by="stage")
    stages = {}
    for stage, (total, count) in stages_after.items():
        total0, count0 = stages_before.get(stage, (0.0, 0.0))
        if count > count0:
            stages[stage] = {"mean_ms": 1000 * (total - total0) / (count - count0), "count": int(count - count0)}
    late = int(np.sum(result.latencies_s > DEADLINE_S))
    return {"rate": rate, "duration_s": duration_s, "codes": dict(result.codes), "degraded": result.degraded,
            "late_over_deadline": late, "max_latency_ms": float(result.latencies_s.max() * 1000) if len(result.latencies_s) else 0.0,
            "p99_ms": result.percentile_ms(99), "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--down-at", type=float, default=5.0)
    parser.add_argument("--up-at", type=float, default=10.0)
    args = parser.parse_args()
    if not (0 < args.rate <= 10_000 and 0 < args.down_at < args.up_at < args.duration <= 600):
        parser.error("need 0 < rate <= 10000 and 0 < down-at < up-at < duration <= 600")
    print(json.dumps(asyncio.run(measure(Settings(), args.rate, args.duration, args.down_at, args.up_at)), indent=2))


if __name__ == "__main__":
    main()
