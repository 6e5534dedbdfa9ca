"""`vitrine bench gateway`: the serving figures, as ratios measured in one run on one machine.

1. Gateway end-to-end vs. a direct `tritonclient` call to the same model (gru4rec, newest version)
   at the same open-loop rate: p50 and p99 of each, and the ratios.
2. The highest rate at p99 ≤ SLO (default 25 ms): a gateway with micro-batching on, one with
   `max_batch=1` (batching off), and the plain one-request-one-inference baseline server
   (`loadtest/baseline_server.py`), each ramped with the same generator.

Like for like: both gateways are fresh processes started here from the same code and settings (the
stack's own gateway may be older and is not measured). Every figure is repeated — comparisons
alternate gateway and direct calls `repeats` times and report medians; each ramp step is decided by
the majority of its runs — and the machine is let settle (CPU mostly idle) before each part.

Traffic: Zipf-distributed users over shoppers whose histories were published first, a cold-start
share of new users, page contexts; every request has a deadline. The experiment is pinned to 100 %
gru4rec during the run and restored afterwards.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import psutil
import redis.asyncio as aioredis
import tritonclient.grpc.aio as triton

from vitrine.contracts import ranker, topics
from vitrine.export.data import synthetic
from vitrine.export.triton_repository import versions
from vitrine.loadtest import scrape
from vitrine.loadtest.cpu_budget import SERVER, CpuBudget, stack_processes
from vitrine.loadtest.cpu_budget import measure as measure_cpu
from vitrine.loadtest.cpu_budget import render as render_budgets
from vitrine.loadtest.load_generator import LoadResult, Outcome, Ramp, highest_rate, run
from vitrine.services.events.publisher import publish
from vitrine.services.features.store import FeatureStore
from vitrine.services.gateway.client import GatewayClient
from vitrine.services.gateway.metrics import BATCH_SIZE
from vitrine.services.gateway.ranking import ServedModel
from vitrine.services.stack.components import local_gateway_settings, settings_env
from vitrine.services.stack.launcher import free_port
from vitrine.settings import Settings
from vitrine.v1 import recommender_pb2 as pb

STOREFRONT_KEY = "vitrine-demo-storefront"
EXPERIMENTER_KEY = "vitrine-demo-experimenter"
PAGES = ("home", "pdp", "cart", "search")
DEADLINE_S = 1.0


@dataclass(frozen=True)
class UserMix:
    warm: list[str]
    cold_share: float
    zipf: float = 1.1

    def picker(self, seed: int) -> Callable[[int], tuple[str, str]]:
        rng = np.random.default_rng(seed)
        ranks = np.arange(1, len(self.warm) + 1, dtype=float) ** -self.zipf
        cumulative = np.cumsum(ranks / ranks.sum())

        def pick(n: int) -> tuple[str, str]:
            page = PAGES[n % len(PAGES)]
            if rng.random() < self.cold_share:
                return f"cold-{seed}-{n}", page
            return self.warm[int(np.searchsorted(cumulative, rng.random()))], page

        return pick


async def prepare_users(settings: Settings, count: int) -> list[str]:
    """Publish real sessions for `count` shoppers (timestamped now) and return their ids."""
    table = synthetic.generate(synthetic.preset("small", seed=99))
    events = list(table.events())
    users = sorted({e.user_id for e in events})[:count]
    keep = set(users)
    tag = f"bench{int(time.time())}"
    chosen = [e.model_copy(update={"user_id": f"{tag}-{e.user_id}", "event_id": f"{tag}-{e.event_id}"}) for e in events if e.user_id in keep]
    await publish(chosen, settings.kafka.bootstrap_servers, topics.EVENTS, retime=True)
    shoppers = [f"{tag}-{u}" for u in users]
    # Wait on the event, not a clock: every shopper's last event visible in the feature store.
    client = aioredis.Redis(host=settings.redis.host, port=settings.redis.port)
    store = FeatureStore(client, settings.features)
    deadline = time.monotonic() + 60
    try:
        while True:
            features = await store.many_user_features(shoppers, int(time.time() * 1000))
            if all(f.has_history for f in features):
                return shoppers
            if time.monotonic() > deadline:
                raise TimeoutError("the feature consumer did not apply the shoppers' events within 60 s")
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


def gateway_sender(client: GatewayClient, pick: Callable[[int], tuple[str, str]]):  # noqa: ANN201
    async def send(n: int) -> Outcome:
        user, page = pick(n)
        reply = await client.recommend(user, k=10, page=page, timeout_s=DEADLINE_S)
        return Outcome(degraded=reply.degraded, variant=reply.variant)

    return send


def triton_sender(client: triton.InferenceServerClient, model: ServedModel, exclude_width: int, seed: int):  # noqa: ANN201
    rng = np.random.default_rng(seed)
    rows = [rng.integers(model.first_item_id, model.first_item_id + len(model.item_ids), size=(1, model.max_len)) for _ in range(64)]

    async def send(n: int) -> Outcome:
        inputs = []
        items = rows[n % len(rows)]
        for name, array in ((ranker.ITEM_IDS, items), (ranker.EVENT_TYPES, np.ones_like(items)),
                            (ranker.EXCLUDE_IDS, np.zeros((1, exclude_width), dtype=np.int64))):
            tensor = triton.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array.astype(np.int64))
            inputs.append(tensor)
        await client.infer(model.name, inputs, model_version=model.version, client_timeout=DEADLINE_S,
                           outputs=[triton.InferRequestedOutput(o) for o in ranker.OUTPUTS])
        return Outcome(variant="direct")

    return send


async def _pin_experiment(settings: Settings, model: str) -> pb.Experiment:
    async with GatewayClient(settings.gateway.address, EXPERIMENTER_KEY) as admin:
        before = await admin.get_experiment()
        await admin.set_experiment(pb.Experiment(name=before.name, salt=before.salt,
                                                 variants=[pb.Variant(name="bench", model_name=model, weight=100)]))
        return before


async def _restore_experiment(settings: Settings, before: pb.Experiment) -> None:
    async with GatewayClient(settings.gateway.address, EXPERIMENTER_KEY) as admin:
        await admin.set_experiment(pb.Experiment(name=before.name, salt=before.salt, variants=before.variants))


def _start(command: list[str], settings: Settings) -> subprocess.Popen:
    return subprocess.Popen(command, env={**os.environ, **settings_env(local_gateway_settings(settings))}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _wait_answering(address: str, key: str | None, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with GatewayClient(address, key) as client:
        while True:
            try:
                await client.recommend("probe", k=1, timeout_s=1)
                return
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


async def settle(report: Callable[[str], None], max_busy: float = 0.25, timeout_s: float = 30) -> float:
    """Wait until the machine is quiet (CPU busy over one second ≤ `max_busy`), so one part's tail
    (Kafka flushing exposures, a consumer catching up) does not land in the next part's figures."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy = await asyncio.to_thread(psutil.cpu_percent, 1.0) / 100
        if busy <= max_busy:
            return busy
        if time.monotonic() > deadline:
            report(f"  (the machine stayed {busy:.0%} busy; measuring anyway)")
            return busy


def _median(values: list[float]) -> float:
    return float(np.median(values))


async def compare_with_direct(gateway: GatewayClient, direct: triton.InferenceServerClient, model: ServedModel,
                              mix: UserMix, exclude_width: int, rate: float, duration_s: float, repeats: int) -> dict[str, object]:
    """Gateway and direct Triton at one rate, alternating `repeats` times; ratios of the medians."""
    pairs = []
    for i in range(repeats):
        g = await run(gateway_sender(gateway, mix.picker(1 + i)), rate, duration_s, warmup_s=2)
        d = await run(triton_sender(direct, model, exclude_width, 1 + i), rate, duration_s, warmup_s=2)
        pairs.append((g, d))
    row: dict[str, object] = {"rate": rate, "repeats": repeats}
    for side, index in (("gateway", 0), ("direct_triton", 1)):
        runs = [pair[index] for pair in pairs]
        row[side] = {"p50_ms": _median([r.percentile_ms(50) for r in runs]), "p99_ms": _median([r.percentile_ms(99) for r in runs]),
                     "generator_fell_behind": any(r.fell_behind for r in runs), "runs": [r.summary() for r in runs]}
    g, d = row["gateway"], row["direct_triton"]
    row["p50_ratio"] = g["p50_ms"] / d["p50_ms"]  # type: ignore[index]
    row["p99_ratio"] = g["p99_ms"] / d["p99_ms"]  # type: ignore[index]
    row["p50_ratio_runs"] = [a.percentile_ms(50) / b.percentile_ms(50) for a, b in pairs]
    return row


async def cpu_budgets(settings: Settings, servers: list[subprocess.Popen], batching_on: Settings, batching_off: Settings,
                      baseline_port: int, model: ServedModel, mix: UserMix, rate: float, duration_s: float) -> list[CpuBudget]:
    """CPU ms per request per process for direct Triton, gateway (batching on/off) and the plain server at `rate`."""
    stack = stack_processes(settings)
    on, off, plain = (psutil.Process(p.pid) for p in servers)

    async def gateway_at(address: str, key: str | None) -> LoadResult:
        async with GatewayClient(address, key) as client:
            return await run(gateway_sender(client, mix.picker(4)), rate, duration_s, warmup_s=1, arrivals="poisson", seed=11)

    async def direct_at() -> LoadResult:
        client = triton.InferenceServerClient(settings.triton.grpc_url)
        try:
            return await run(triton_sender(client, model, settings.gateway.exclude_width, 4), rate, duration_s, warmup_s=1, arrivals="poisson", seed=11)
        finally:
            await client.close()

    budgets = [(await measure_cpu("direct Triton", stack, direct_at))[0]]
    for label, process, server, address, key in (
            ("gateway, batching on", on, batching_on, batching_on.gateway.address, STOREFRONT_KEY),
            ("gateway, batching off", off, batching_off, batching_off.gateway.address, STOREFRONT_KEY),
            ("plain server", plain, None, f"127.0.0.1:{baseline_port}", None)):
        before = await _batches(server) if server else None
        budget, _ = await measure_cpu(label, {**stack, SERVER: [process]}, lambda a=address, k=key: gateway_at(a, k))
        if server and before is not None:
            after = await _batches(server)
            calls = after[1] - before[1]
            budget = replace(budget, mean_batch=(after[0] - before[0]) / calls if calls else None)
        budgets.append(budget)
    return budgets


async def _batches(gateway: Settings) -> tuple[float, float]:
    """(requests, Triton calls) so far, from the gateway's own batch-size histogram."""
    cfg = gateway.gateway
    return scrape.histogram_totals(await scrape.fetch(cfg.metrics_host, cfg.metrics_port), BATCH_SIZE).get("", (0.0, 0.0))


async def bench(settings: Settings, rates: list[float], duration_s: float, slo_ms: float, start_rate: float,
                report: Callable[[str], None] = print, repeats: int = 3, max_rate: float = 20_000,
                settle_timeout_s: float = 30, budget_rate: float | None = None) -> dict[str, object]:
    model_name = "gru4rec"
    folder = settings.triton.model_repository / model_name
    model = ServedModel.load(settings.triton.model_repository, model_name, str(versions(folder)[-1]))
    report("preparing shoppers …")
    warm = await prepare_users(settings, 400)
    mix = UserMix(warm=warm, cold_share=0.1)
    before = await _pin_experiment(settings, model_name)

    def gateway_settings(**changes: object) -> Settings:
        return settings.model_copy(update={"gateway": settings.gateway.model_copy(update={
            "port": free_port(), "metrics_port": free_port(), **changes})})

    batching_on, batching_off = gateway_settings(), gateway_settings(max_batch=1)
    baseline_port = free_port()
    extra = [
        _start([sys.executable, "-m", "vitrine", "gateway", "run"], batching_on),
        _start([sys.executable, "-m", "vitrine", "gateway", "run"], batching_off),
        _start([sys.executable, "-m", "vitrine.loadtest.baseline_server", "--model", model_name, "--port", str(baseline_port)], settings),
    ]
    results: dict[str, object] = {"slo_ms": slo_ms, "duration_s": duration_s, "repeats": repeats}
    try:
        for address in (batching_on.gateway.address, batching_off.gateway.address):
            await _wait_answering(address, STOREFRONT_KEY)
        await _wait_answering(f"127.0.0.1:{baseline_port}", None)
        comparison = []
        async with GatewayClient(batching_on.gateway.address, STOREFRONT_KEY) as gateway:
            direct = triton.InferenceServerClient(settings.triton.grpc_url)
            try:
                for rate in rates:
                    await settle(report, timeout_s=settle_timeout_s)
                    row = await compare_with_direct(gateway, direct, model, mix, settings.gateway.exclude_width, rate, duration_s, repeats)
                    comparison.append(row)
                    g, d = row["gateway"], row["direct_triton"]
                    report(f"  {rate:g}/s (median of {repeats}): gateway p50 {g['p50_ms']:.2f} ms p99 {g['p99_ms']:.2f} ms | "
                           f"direct Triton p50 {d['p50_ms']:.2f} ms p99 {d['p99_ms']:.2f} ms | "
                           f"p50 ratio per run {', '.join(f'{x:.2f}' for x in row['p50_ratio_runs'])}")
            finally:
                await direct.close()
        results["comparison"] = comparison

        async def ramp(address: str, key: str | None, label: str) -> Ramp:
            async with GatewayClient(address, key) as client:
                async def measure(rate: float) -> LoadResult:
                    result = await run(gateway_sender(client, mix.picker(2)), rate, duration_s, warmup_s=1, arrivals="poisson", seed=int(rate))
                    report(f"  {label} {rate:,.0f}/s → p99 {result.percentile_ms(99):.1f} ms, errors {result.errors}, "
                           f"achieved {result.achieved_rate:,.0f}/s{' (generator fell behind)' if result.fell_behind else ''}")
                    return result

                return await highest_rate(measure, slo_ms, start_rate, max_rate=max_rate, repeats=repeats)

        capacity = {}
        for label, address, key in (("batching on", batching_on.gateway.address, STOREFRONT_KEY),
                                     ("batching off", batching_off.gateway.address, STOREFRONT_KEY),
                                     ("plain baseline", f"127.0.0.1:{baseline_port}", None)):
            await settle(report, timeout_s=settle_timeout_s)
            report(f"ramping {label} …")
            capacity[label] = (await ramp(address, key, label)).summary()
        results["capacity"] = capacity
        # Why the capacities differ: CPU per request of every process, each configuration at one common rate
        # that all of them sustain (90 % of the lowest capacity), where batches can form.
        budget_rate = budget_rate or 0.9 * min(v["highest_rate"] for v in capacity.values())
        if budget_rate > 0:
            await settle(report, timeout_s=settle_timeout_s)
            budgets = await cpu_budgets(settings, extra, batching_on, batching_off, baseline_port, model, mix, budget_rate, duration_s)
            results["cpu_budget"] = {"rate": budget_rate, "by_configuration": [asdict(b) for b in budgets]}
            report(f"CPU per request at {budget_rate:,.0f}/s:\n{render_budgets(budgets)}")
        # Headroom: at 70 % of the gateway's highest rate, the tail must stay close to the median.
        rate = 0.7 * capacity["batching on"]["highest_rate"]
        if rate > 0:
            await settle(report, timeout_s=settle_timeout_s)
            async with GatewayClient(batching_on.gateway.address, STOREFRONT_KEY) as client:
                steady = await run(gateway_sender(client, mix.picker(3)), rate, duration_s * 2, warmup_s=2, arrivals="poisson", seed=7)
            results["at_70_percent"] = {**steady.summary(), "p99_over_p50": steady.percentile_ms(99) / steady.percentile_ms(50)}
            results["_at_70_percent_result"] = steady
            report(f"  70 % of capacity ({rate:,.0f}/s): p50 {steady.percentile_ms(50):.1f} ms, p99 {steady.percentile_ms(99):.1f} ms, "
                   f"errors {steady.errors}")
    finally:
        for process in extra:
            process.terminate()
            process.wait(timeout=20)
        await _restore_experiment(settings, before)
    return results


def render(results: dict) -> str:
    lines = ["| measure | gateway | direct Triton | ratio |", "| --- | ---: | ---: | ---: |"]
    for row in results["comparison"]:
        g, d = row["gateway"], row["direct_triton"]
        if g["generator_fell_behind"] or d["generator_fell_behind"]:
            lines.append(f"| (at {row['rate']:g}/s the load generator fell behind: client-bound figures) | | | |")
        n = row.get("repeats", 1)
        lines.append(f"| p50 at {row['rate']:g}/s (median of {n}) | {g['p50_ms']:.2f} ms | {d['p50_ms']:.2f} ms | {row['p50_ratio']:.2f}× |")
        lines.append(f"| p99 at {row['rate']:g}/s (median of {n}) | {g['p99_ms']:.2f} ms | {d['p99_ms']:.2f} ms | {row['p99_ratio']:.2f}× |")
    capacity = results["capacity"]
    on, off, plain = (capacity[k]["highest_rate"] for k in ("batching on", "batching off", "plain baseline"))
    lines += ["", f"| highest rate at p99 ≤ {results['slo_ms']:g} ms | req/s |", "| --- | ---: |",
              f"| gateway, micro-batching on | {on:,.0f} |", f"| gateway, micro-batching off | {off:,.0f} |",
              f"| plain one-request-one-inference server | {plain:,.0f} |",
              f"| batching on ÷ off | {on / off:.2f}× |" if off else "| batching on ÷ off | n/a |",
              f"| gateway ÷ plain server | {on / plain:.2f}× |" if plain else "| gateway ÷ plain server | n/a |"]
    steady = results.get("at_70_percent")
    if steady:
        verdict = "holds" if steady["p99_over_p50"] <= 3 and not steady["errors"] else "does not hold"
        lines += [f"| at 70 % of that rate ({steady['target_rate']:,.0f}/s): p99 ÷ p50, failed requests | "
                  f"{steady['p99_over_p50']:.1f}×, {sum(steady['errors'].values())} ({verdict}: aim ≤ 3×, none) |"]
    budget = results.get("cpu_budget")
    if budget:
        budgets = [CpuBudget(**b) for b in budget["by_configuration"]]
        total = {b.label: b.total_ms for b in budgets}
        lines += ["", f"CPU spent per request by every process, each configuration at {budget['rate']:,.0f}/s:", "",
                  render_budgets(budgets), "",
                  f"If CPU alone bounded the highest rate, batching on ÷ off could reach at most "
                  f"{total['gateway, batching off'] / total['gateway, batching on']:.2f}× and the gateway ÷ the plain server "
                  f"{total['plain server'] / total['gateway, batching on']:.2f}×."]
    behind = [k for k, v in capacity.items() if v["client_bound"]]
    if behind:
        lines.append(f"\nThe load generator fell behind at the first failing rate of: {', '.join(behind)} "
                     "(those figures are lower bounds: the client may be the limit).")
    return "\n".join(lines)
