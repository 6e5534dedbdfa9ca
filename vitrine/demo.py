"""`vitrine demo`: a simulated shopper against the running stack, printed step by step, then a short
simulated experiment (the loop: recommendations → shoppers' reactions → events → outcomes).

1. Background traffic (a synthetic storefront's events, so that popularity and trending exist), and a
   wait until the feature consumer has applied all of it: a shopper asking while a backlog of
   thousands of events is being written to Redis would measure the backlog, not the pipeline.
2. One new shopper: cold start → views along a real session path → add to cart → purchase. For each
   event the demo asks the gateway the *same* request (same page and context item, the k items it
   prints) just before publishing the event and then until the answer's `features_ts_ms` reaches the
   event's time: that is when the answer reflects the event (Kafka → feature consumer → Redis →
   gateway → Triton). Whether the printed list changed is then a comparison of like with like.
3. A simulated experiment: control = popularity, treatment = gru4rec, 50/50, with `vitrine simulate`'s
   shoppers reacting to what each arm shows them; each shopper's pre-period (her events of the days
   before, as many as her activity, which also drives her clicks) is published first, so the report's
   CUPED has a covariate and shows the variance it removes.
4. The retraining loop: `vitrine pipeline run` on the event archive (which holds the demo's traffic):
   validate → train → evaluate against the served champion → gate → (export, load, register). On a few
   minutes of traffic the candidates lose to the champion, and the run says so with its numbers.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from vitrine.contracts import topics
from vitrine.contracts.events import Event, EventType
from vitrine.export.data import synthetic
from vitrine.services.events.publisher import EventSink, publish
from vitrine.services.features.store import FeatureStore
from vitrine.services.gateway.client import GatewayClient
from vitrine.settings import Settings
from vitrine.v1 import recommender_pb2 as pb

DEMO_KEY = "vitrine-demo-storefront"
EXPERIMENTER_KEY = "vitrine-demo-experimenter"
SHOWN = 6
"""Items asked for and printed: what is compared is what is shown."""
STEP_TIMEOUT_S = 5.0
POLL_S = 0.005
"""Between two asks while waiting for an event to show: the resolution of the printed times."""
CATCH_UP_TIMEOUT_S = 180.0
BACKGROUND_RATE = 5_000.0
"""Events per second of the background traffic (about what the consumer applies on 2 cores)."""
EXPERIMENT = (("control", "popularity"), ("treatment", "gru4rec"))
EXPERIMENT_S = 75.0
EXPERIMENT_RATE = 20.0


def _line(reply: pb.RecommendResponse) -> str:
    items = ", ".join(i.item_id for i in reply.items)
    state = f"degraded: {reply.degraded_reason}" if reply.degraded else f"{reply.model_name}:{reply.model_version or '-'}"
    return f"[variant {reply.variant}, {state}] {items}"

JOIN_TIMEOUT_S = 60.0
"""How long the demo waits for the outcome service to join the simulated answers before reporting."""


async def caught_up(settings: Settings, timeout_s: float = CATCH_UP_TIMEOUT_S) -> float:
    """Wait until the feature consumer's offsets stored in Redis reach the end of the events topic as it
    is now; returns the seconds waited. Raises TimeoutError naming the lag left."""
    cfg = settings.features
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()  # fetches the cluster's metadata
        partitions = [TopicPartition(cfg.events_topic, p) for p in sorted(consumer.partitions_for_topic(cfg.events_topic) or ())]
        ends = await consumer.end_offsets(partitions) if partitions else {}
    finally:
        await consumer.stop()
    redis = aioredis.Redis(host=settings.redis.host, port=settings.redis.port, socket_timeout=5)
    store = FeatureStore(redis, cfg)
    started = time.monotonic()
    try:
        while True:
            stored = await store.stored_offsets(cfg.group_id, cfg.events_topic)
            lag = sum(max(0, end - stored.get(tp.partition, 0)) for tp, end in ends.items())
            if lag == 0:
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"the feature consumer is still {lag:,} events behind after {timeout_s:g}s")
            await asyncio.sleep(0.1)
    finally:
        await redis.aclose()


async def _reflects(client: GatewayClient, shopper: str, page: str, item: str, event_ts_ms: int) -> tuple[pb.RecommendResponse, float | None]:
    """Ask until the answer's features include the event (features_ts_ms ≥ its time): (answer, ms since the
    event's time, which was taken just before it was sent to Kafka) or (last answer, None)."""
    while True:
        reply = await client.recommend(shopper, k=SHOWN, page=page, item_id=item)
        elapsed_ms = time.time() * 1000 - event_ts_ms
        if reply.features_ts_ms >= event_ts_ms:
            return reply, elapsed_ms
        if elapsed_ms > STEP_TIMEOUT_S * 1000:
            return reply, None
        await asyncio.sleep(POLL_S)


def _items(reply: pb.RecommendResponse) -> list[str]:
    return [i.item_id for i in reply.items]


async def run(settings: Settings, echo: Callable[[str], None] = print, background_events: int = 20_000,
              experiment_s: float = EXPERIMENT_S) -> None:
    bootstrap = settings.kafka.bootstrap_servers
    table = synthetic.generate(synthetic.preset("default"))
    echo(f"1. background traffic: {background_events:,} storefront events → Kafka '{topics.EVENTS}'")
    report = await publish(table.events(), bootstrap, topics.EVENTS, limit=background_events, rate=BACKGROUND_RATE)
    waited = await caught_up(settings)
    echo(f"   published at {report.achieved_rate:,.0f} events/s; the feature consumer had applied all of them "
         f"{waited:.1f}s after the last was sent")

    # A real session path from the generator, replayed by a brand-new shopper.
    users: dict[str, list[str]] = {}
    for user, item in zip(table.user_id.tolist(), table.item_id.tolist(), strict=True):
        steps = users.setdefault(user, [])
        if not steps or steps[-1] != item:
            steps.append(item)
    path = max(users.values(), key=len)[:4]
    shopper = f"demo-{uuid.uuid4().hex[:6]}"
    async with GatewayClient(settings.gateway.address, DEMO_KEY) as client, EventSink(bootstrap, topics.EVENTS) as sink:
        reply = await client.recommend(shopper, k=SHOWN, page="home")
        echo(f"2. new shopper {shopper}, no history → cold start (trending)\n   {_line(reply)}")
        steps = [(item, EventType.VIEW) for item in path] + [(path[-1], EventType.ADD_TO_CART)]
        for number, (item, kind) in enumerate(steps):
            # The same request before and after the event: only the event can change the answer.
            before = _items(await client.recommend(shopper, k=SHOWN, page="pdp", item_id=item))
            ts_ms = int(time.time() * 1000)
            await sink.send(Event(event_id=f"{shopper}-{number}", user_id=shopper, item_id=item, type=kind, ts_ms=ts_ms))
            reply, ms = await _reflects(client, shopper, "pdp", item, ts_ms)
            if ms is None:
                echo(f"3.{number + 1} {kind.value} {item} → not in the answer's features after {STEP_TIMEOUT_S:g}s\n   {_line(reply)}")
                continue
            changed = "the answer changed" if _items(reply) != before else "the shown items stayed the same"
            echo(f"3.{number + 1} {kind.value} {item} → in the answer's features after {ms:.0f} ms; {changed}\n   {_line(reply)}")
        bought = reply.items[0].item_id if reply.items else path[0]
        ts_ms = int(time.time() * 1000)
        await sink.send(Event(event_id=f"{shopper}-buy", user_id=shopper, item_id=bought, type=EventType.PURCHASE, ts_ms=ts_ms))
        reply, ms = await _reflects(client, shopper, "cart", "", ts_ms)
        gone = "it leaves the recommendations" if bought not in _items(reply) else "it is STILL recommended"
        when = f"after {ms:.0f} ms" if ms is not None else f"not seen within {STEP_TIMEOUT_S:g}s"
        echo(f"4. purchase {bought} → in the answer's features {when}; {gone}\n   {_line(reply)}")
        variants = [(await client.recommend(f"ab-demo-{n}", k=1)).variant for n in range(200)]
        split = {v: variants.count(v) for v in sorted(set(variants))}
        echo(f"5. A/B: 200 other users → {split}; change it live with `vitrine ab set` (key {EXPERIMENTER_KEY})")
    if experiment_s > 0:
        await _experiment(settings, echo, experiment_s)
        await _retrain(echo)
    echo(f"8. watch it: Prometheus {settings.prometheus.url} · gateway metrics "
         f"http://{settings.gateway.metrics_host}:{settings.gateway.metrics_port}/metrics · "
         f"feature metrics http://{settings.features.metrics_host}:{settings.features.metrics_port}/metrics")


async def _retrain(echo: Callable[[str], None]) -> None:
    """One manual pipeline run on the archive (a subprocess, as the trigger service starts it); its outcome is shown,
    whatever it is — a rejected candidate is the loop working, not a demo failure."""
    import json
    import sys

    echo("7. the retraining loop: `vitrine pipeline run` on the event archive (validate → train → evaluate against the "
         "served champion → gate → export, load in Triton, register in MLflow)")
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "vitrine", "pipeline", "run", "--json",
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    try:
        record = json.loads(out)
    except ValueError:
        echo(f"   the run printed no record (exit {process.returncode}): {err.decode(errors='replace').strip()[-300:]}")
        return
    data = record.get("steps", {}).get("validate", {}).get("data", {})
    echo(f"   run {record['run_id']} on {data.get('events', '?')} archived events: {record['status']}")
    for line in str(record.get("reason", "")).split(" / ")[:3]:
        echo(f"     {line}")
    echo(f"   every step, check and number: `vitrine pipeline status {record['run_id']}`; Alertmanager starts the same run "
         "when the drift alert fires")


async def _experiment(settings: Settings, echo: Callable[[str], None], seconds: float) -> None:
    """Set control = popularity vs treatment = gru4rec (50/50) and let simulated shoppers react for `seconds`."""
    from vitrine.services.simulator.runner import Simulation, SimulationConfig, render

    async with GatewayClient(settings.gateway.address, EXPERIMENTER_KEY) as admin:
        current = await admin.get_experiment()
        # A salt and shoppers of this run's own: a new test (its own α; a repeated demo does not continue the last one's),
        # whose shoppers' histories really precede their first exposure in it (CUPED's covariate).
        stamp = int(time.time())
        experiment = pb.Experiment(name=current.name, salt=f"demo-{stamp}", mode="ab", variants=[
            pb.Variant(name=name, model_name=model, weight=100 // len(EXPERIMENT)) for name, model in EXPERIMENT])
        applied = await admin.set_experiment(experiment)
    arms = " vs ".join(f"{v.name} = {v.model_name}" for v in applied.variants)
    config = SimulationConfig(rate=EXPERIMENT_RATE, duration_s=seconds, seed=stamp, user_prefix=f"d{stamp}-")
    echo(f"6. a simulated experiment (revision {applied.revision}): {arms}, 50/50; {config.rate:g} shopper visits/s "
         f"for {seconds:g}s (`vitrine simulate`): each shopper views an item, is shown {config.k} items, clicks by "
         "relevance to her (her categories, where sessions go next) × position, and may buy; before her first visit, her "
         f"history of the {config.pre_period.days:g} days before is published (as many events as she is active), the covariate "
         "of CUPED")
    simulation = Simulation(settings, config)
    marks = {int(config.rate * seconds * q) for q in (0.25, 0.5, 0.75)}

    def progress(done: int, due: int) -> None:
        if done in marks:
            echo(f"   … {done:,} of {due:,} visits")

    report = await simulation.run(progress)
    echo("   " + render(report).replace("\n", "\n   "))
    # The analysis: wait until the outcome service has joined every answer the simulation got, then report.
    from vitrine.commands.ab_report import build
    from vitrine.services.outcomes.store import OutcomeStore

    # Every event the run published was acknowledged before it returned: the ends of the events topic now bound them,
    # so once the outcome service's stored offsets reach these ends, every shopper's pre_events is counted.
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        events_topic = settings.outcomes.events_topic
        ends = await consumer.end_offsets([TopicPartition(events_topic, p) for p in range(settings.kafka.partitions)])
    finally:
        await consumer.stop()
    client = aioredis.Redis(host=settings.redis.host, port=settings.redis.port)
    try:
        store = OutcomeStore(client, settings.outcomes)
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        joined = 0
        while time.monotonic() < deadline:
            joined = sum(r.exposures for r in await store.user_outcomes(applied.name, applied.revision))
            stored = await store.stored_offsets(settings.outcomes.group_id)
            if joined >= report.requests and all(stored.get((events_topic, tp.partition), -1) >= end for tp, end in ends.items()):
                break
            await asyncio.sleep(0.5)
    finally:
        await client.aclose()
    analysis = await build(settings, applied.revision, with_guardrails=True)
    echo(f"   the outcome service joined {joined:,} of {report.requests:,} answers with the shoppers' later events; "
         f"`vitrine ab report` (per user, 95 % intervals, always-valid test, SRM, guardrails):")
    echo("   " + analysis.table().replace("\n", "\n   "))
    echo(f"   the split stays until `vitrine ab set` changes it; `vitrine ab report --png report.png` draws the lift over time")
