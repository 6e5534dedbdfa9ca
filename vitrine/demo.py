"""`vitrine demo`: a simulated shopper against the running stack, printed step by step.

Background traffic first (a synthetic storefront's events, so that popularity and trending exist),
then one new shopper: cold start → views along a real session path → a purchase, with the gateway's
answer after each step. Each step waits until the event is visible in the recommendations, which
shows the whole loop: Kafka → feature consumer → Redis → gateway → Triton.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from vitrine.contracts import topics
from vitrine.contracts.events import Event, EventType
from vitrine.export.data import synthetic
from vitrine.services.events.publisher import publish
from vitrine.services.gateway.client import GatewayClient
from vitrine.settings import Settings

DEMO_KEY = "vitrine-demo-storefront"
STEP_TIMEOUT_S = 5.0


def _line(reply, shown: int = 6) -> str:  # noqa: ANN001
    items = ", ".join(i.item_id for i in reply.items[:shown])
    state = f"degraded: {reply.degraded_reason}" if reply.degraded else f"{reply.model_name}:{reply.model_version or '-'}"
    return f"[variant {reply.variant}, {state}] {items}"


async def run(settings: Settings, echo: Callable[[str], None] = print, background_events: int = 20_000) -> None:
    bootstrap = settings.kafka.bootstrap_servers
    table = synthetic.generate(synthetic.preset("default"))
    echo(f"1. background traffic: {background_events:,} storefront events → Kafka '{topics.EVENTS}'")
    report = await publish(table.events(), bootstrap, topics.EVENTS, limit=background_events)
    echo(f"   published at {report.achieved_rate:,.0f} events/s")

    # A real session path from the generator, replayed by a brand-new shopper.
    users: dict[str, list[str]] = {}
    for user, item in zip(table.user_id.tolist(), table.item_id.tolist(), strict=True):
        steps = users.setdefault(user, [])
        if not steps or steps[-1] != item:
            steps.append(item)
    path = max(users.values(), key=len)[:4]
    shopper = f"demo-{uuid.uuid4().hex[:6]}"
    async with GatewayClient(settings.gateway.address, DEMO_KEY) as client:
        reply = await client.recommend(shopper, k=10, page="home")
        echo(f"2. new shopper {shopper}, no history → cold start (trending)\n   {_line(reply)}")
        before = [i.item_id for i in reply.items]
        now_ms = int(time.time() * 1000)
        steps = [(item, EventType.VIEW) for item in path] + [(path[-1], EventType.ADD_TO_CART)]
        for number, (item, kind) in enumerate(steps):
            event = Event(event_id=f"{shopper}-{number}", user_id=shopper, item_id=item, type=kind, ts_ms=now_ms + number)
            await publish([event], bootstrap, topics.EVENTS, retime=False)
            sent = time.monotonic()
            while True:
                reply = await client.recommend(shopper, k=10, page="pdp", item_id=item)
                current = [i.item_id for i in reply.items]
                if current != before or time.monotonic() - sent > STEP_TIMEOUT_S:
                    break
            before = current
            echo(f"3.{number + 1} {kind.value} {item} → answer changed after {1000 * (time.monotonic() - sent):.0f} ms\n   {_line(reply)}")
        bought = reply.items[0].item_id if reply.items else path[0]
        await publish([Event(event_id=f"{shopper}-buy", user_id=shopper, item_id=bought, type=EventType.PURCHASE,
                             ts_ms=now_ms + 100)], bootstrap, topics.EVENTS, retime=False)
        sent = time.monotonic()
        while time.monotonic() - sent < STEP_TIMEOUT_S:
            reply = await client.recommend(shopper, k=10, page="cart")
            if bought not in [i.item_id for i in reply.items]:
                break
        echo(f"4. purchase {bought} → it leaves the recommendations\n   {_line(reply)}")
        variants = [(await client.recommend(f"ab-demo-{n}", k=1)).variant for n in range(200)]
        split = {v: variants.count(v) for v in sorted(set(variants))}
        echo(f"5. A/B: 200 other users → {split}; change it live with `vitrine ab set` (key vitrine-demo-experimenter)")
    echo(f"6. watch it: Prometheus {settings.prometheus.url} · gateway metrics "
         f"http://{settings.gateway.metrics_host}:{settings.gateway.metrics_port}/metrics · "
         f"feature metrics http://{settings.features.metrics_host}:{settings.features.metrics_port}/metrics")
