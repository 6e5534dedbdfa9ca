"""`vitrine loadtest`: open-loop load on the gateway with a realistic user mix, optionally while
events churn the features, with percentiles per variant, a JSON summary and a PNG.

Users: Zipf-distributed over the synthetic storefront's shoppers (whose events `vitrine demo` or
`vitrine events generate` published), a cold-start share of unknown users, page contexts.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np

from vitrine.contracts import topics
from vitrine.export.data import synthetic
from vitrine.loadtest.load_generator import LoadResult, run
from vitrine.loadtest.serving_bench import STOREFRONT_KEY, UserMix, gateway_sender
from vitrine.services.events.publisher import publish
from vitrine.services.gateway.client import GatewayClient
from vitrine.settings import Settings


async def load(settings: Settings, rate: float, duration_s: float, warmup_s: float, arrivals: str, cold_share: float,
               events_rate: float | None, seed: int) -> LoadResult:
    table = synthetic.generate(synthetic.preset("default"))
    mix = UserMix(warm=sorted(set(table.user_id.tolist())), cold_share=cold_share)
    churn = None
    if events_rate:
        churn = asyncio.create_task(publish(table.events(), settings.kafka.bootstrap_servers, topics.EVENTS,
                                            rate=events_rate, duration_s=warmup_s + duration_s, retime=True))
    try:
        async with GatewayClient(settings.gateway.address, STOREFRONT_KEY) as client:
            return await run(gateway_sender(client, mix.picker(seed)), rate, duration_s, warmup_s, arrivals, seed)  # type: ignore[arg-type]
    finally:
        if churn is not None:
            await churn


def _worker(args: tuple) -> dict:
    """One load process (spawned): its share of the rate, raw samples back to the parent."""
    rate, duration_s, warmup_s, arrivals, cold_share, events_rate, seed = args
    result = asyncio.run(load(Settings(), rate, duration_s, warmup_s, arrivals, cold_share, events_rate, seed))
    return {"latencies": result.latencies_s.tolist(), "codes": dict(result.codes), "degraded": result.degraded,
            "by_variant": {v: s.tolist() for v, s in result.by_variant.items()}, "behind": result.behind_s.tolist(),
            "timeline": result.timeline.tolist()}


def load_in_processes(processes: int, rate: float, duration_s: float, warmup_s: float, arrivals: str, cold_share: float,
                      events_rate: float | None, seed: int) -> LoadResult:
    """The same open-loop load from `processes` processes (rate split evenly, seeds distinct), samples merged:
    for rates one Python process cannot hold on its own."""
    import multiprocessing
    from collections import Counter
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(rate / processes, duration_s, warmup_s, arrivals, cold_share, events_rate if n == 0 else None, seed + n)
            for n in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_worker, jobs))
    by_variant: dict[str, list[float]] = {}
    codes: Counter = Counter()
    for part in parts:
        codes.update(part["codes"])
        for variant, samples in part["by_variant"].items():
            by_variant.setdefault(variant, []).extend(samples)
    return LoadResult(
        target_rate=rate, duration_s=duration_s, latencies_s=np.concatenate([np.array(p["latencies"]) for p in parts]),
        codes=codes, degraded=sum(p["degraded"] for p in parts), by_variant={v: np.array(s) for v, s in by_variant.items()},
        behind_s=np.concatenate([np.array(p["behind"]) for p in parts]),
        timeline=np.concatenate([np.array(p["timeline"]) for p in parts]),
    )


def write_outputs(result: LoadResult, json_path: Path | None, png_path: Path | None) -> None:
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result.summary(), indent=2))
    if png_path is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        latencies_ms = result.latencies_s * 1000
        fig, (over_time, histogram) = plt.subplots(1, 2, figsize=(13, 4.5), constrained_layout=True)
        over_time.scatter(result.timeline, latencies_ms, s=2, alpha=0.4)
        over_time.set(xlabel="seconds since start", ylabel="latency from intended send (ms)", yscale="log",
                      title=f"{result.achieved_rate:,.0f} req/s achieved of {result.target_rate:,.0f}")
        histogram.hist(latencies_ms, bins=np.logspace(np.log10(max(latencies_ms.min(), 0.1)), np.log10(latencies_ms.max() + 1), 60))
        for q in (50, 99, 99.9):
            histogram.axvline(result.percentile_ms(q), color="red", linestyle="--", linewidth=0.8)
            histogram.text(result.percentile_ms(q), histogram.get_ylim()[1] * 0.9, f"p{q:g}", fontsize=7)
        histogram.set(xscale="log", xlabel="latency (ms)", ylabel="requests", title="latency histogram")
        png_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png_path, dpi=80)
        plt.close(fig)


def render(result: LoadResult) -> str:
    s = result.summary()
    lines = [
        f"target {s['target_rate']:,.0f}/s, achieved {s['achieved_rate']:,.0f}/s over {result.duration_s:g}s, {s['sent']:,} requests",
        f"latency from intended send: p50 {s['p50_ms']:.2f} ms · p90 {s['p90_ms']:.2f} ms · p99 {s['p99_ms']:.2f} ms · p99.9 {s['p999_ms']:.2f} ms",
        f"errors by code: {s['errors'] or 'none'} · degraded share {s['degraded_share']:.1%}",
    ]
    for variant, stats in s["per_variant"].items():
        lines.append(f"  {variant}: p50 {stats['p50_ms']:.2f} ms, p99 {stats['p99_ms']:.2f} ms over {stats['n']:,} requests")
    if s["generator_fell_behind"]:
        lines.append(f"the generator fell behind its schedule (up to {s['max_behind_ms']:.0f} ms): the client, not the server, limited this run")
    return "\n".join(lines)
