"""`vitrine simulate`: open-loop simulated shoppers against the gateway, their reactions published to Kafka.

Visits arrive on an open-loop schedule (`rate` per second, Poisson or constant; a visit starts when it
is due whatever the gateway does); each visit's shopper is drawn in proportion to her latent activity
(`shopper.ShopperModel.activity`). Before the first visit, every shopper the schedule will bring gets
her pre-period (`SimulationConfig.pre_period`, on by default): her history of the days before the run,
dated before it and published (acknowledged by Kafka) before any request, so the outcome service counts
it as her `pre_events`, the CUPED covariate. One visit of shopper u (a storefront user, with her affinities):

1. she lands on an item page — the item she clicked on her previous visit, else where she goes by
   herself (a successor of her recent item, or a popular item of one of her categories), her recent
   item at first being the last item of her history in the storefront's events — and a `view` is
   published to Kafka `events`;
2. after `dwell_s` (the page is read; meanwhile the view reaches her features) the page asks the gateway
   for k items next to that item (`page="pdp"`);
3. she reacts (`shopper.ShopperModel`): clicks, add-to-carts and purchases, published as events, so that
   the features, the exposure join and the outcome service see what a real shop would send.

A shopper's visits never overlap (a lock per shopper): her events stay in order. The report counts
requests, impressions and clicks per variant as the simulator saw them (in interleaving mode per team,
from each slot's owner) and the events acknowledged by Kafka by type (the pre-period's among them, and
also on their own).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import grpc
import numpy as np

from vitrine.contracts import topics
from vitrine.contracts.events import Event, EventType
from vitrine.export.data import synthetic
from vitrine.services.events.publisher import EventSink
from vitrine.services.gateway.client import GatewayClient
from vitrine.services.simulator.shopper import ChoiceParams, PrePeriod, ShopperModel, item_index
from vitrine.settings import Settings

STOREFRONT_KEY = "vitrine-demo-storefront"
PAGE = "pdp"


@dataclass(frozen=True)
class SimulationConfig:
    rate: float = 20.0
    """Visits per second (each visit: one recommendation request)."""
    duration_s: float = 60.0
    seed: int = 0
    k: int = 10
    arrivals: str = "poisson"
    dwell_s: float = 0.3
    """From the page view to the recommendation request."""
    preset: str = "default"
    storefront_seed: int = 7
    """The storefront (preset, seed) the served models were trained on: its users and ground truth."""
    users: int | None = None
    """Draw shoppers from the first `users` storefront users only (None: all)."""
    user_prefix: str = ""
    """Prepended to the storefront's user ids ("u17" → prefix + "u17"): a run of shoppers of its own."""
    api_key: str = STOREFRONT_KEY
    timeout_s: float = 1.0
    max_in_flight: int = 1_000
    topic: str = topics.EVENTS
    params: ChoiceParams = field(default_factory=ChoiceParams)
    pre_period: PrePeriod = field(default_factory=PrePeriod)
    """Each shopper's history before her first visit (`PrePeriod(events=0)`: none)."""

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.duration_s <= 0 or self.k < 1 or self.dwell_s < 0 or self.timeout_s <= 0:
            raise ValueError("rate, duration_s, timeout_s must be > 0, k >= 1, dwell_s >= 0")
        if self.arrivals not in ("poisson", "constant"):
            raise ValueError("arrivals must be poisson or constant")
        if self.users is not None and self.users < 1:
            raise ValueError("users must be at least 1")


@dataclass
class VariantTally:
    requests: int = 0
    impressions: int = 0
    clicks: int = 0
    add_to_carts: int = 0
    purchases: int = 0
    requests_with_click: int = 0
    degraded: int = 0
    expected_clicks: float = 0.0
    """Sum over lists of the click model's expected clicks: the CTR without the draws' noise."""
    models: Counter = field(default_factory=Counter)

    @property
    def ctr(self) -> float:
        return self.clicks / self.impressions if self.impressions else 0.0

    @property
    def expected_ctr(self) -> float:
        return self.expected_clicks / self.impressions if self.impressions else 0.0


@dataclass
class SimulationReport:
    run_id: str
    visits_due: int = 0
    requests: int = 0
    errors: Counter = field(default_factory=Counter)
    skipped: int = 0
    """Visits not started because `max_in_flight` visits were still running (the client fell behind)."""
    max_behind_s: float = 0.0
    seconds: float = 0.0
    events: Counter = field(default_factory=Counter)
    """Events acknowledged by Kafka, by type (the pre-period's included)."""
    pre_period: Counter = field(default_factory=Counter)
    """The pre-period's events, by type."""
    pre_period_shoppers: int = 0
    """Shoppers given a pre-period (every shopper the schedule brings)."""
    pre_period_s: float = 0.0
    """Seconds spent publishing the pre-period before the first visit."""
    variants: dict[str, VariantTally] = field(default_factory=lambda: defaultdict(VariantTally))
    """A/B: per response variant. Interleaving: per slot owner (team)."""
    interleaved: Counter = field(default_factory=Counter)
    """Interleaving: requests whose clicks went more to each team ("tie" when even, clicks > 0)."""
    users: int = 0

    @property
    def events_sent(self) -> int:
        return sum(self.events.values())

    def to_dict(self) -> dict:
        out: dict = {"run_id": self.run_id, "visits_due": self.visits_due, "requests": self.requests,
                     "errors": dict(self.errors), "skipped": self.skipped, "max_behind_s": self.max_behind_s,
                     "seconds": self.seconds, "events": dict(self.events), "events_sent": self.events_sent,
                     "interleaved": dict(self.interleaved), "users": self.users, "pre_period": dict(self.pre_period),
                     "pre_period_shoppers": self.pre_period_shoppers, "pre_period_s": self.pre_period_s}
        out["variants"] = {name: {**{k: v for k, v in asdict(t).items() if k != "models"}, "ctr": t.ctr,
                                  "expected_ctr": t.expected_ctr, "models": dict(t.models)}
                           for name, t in sorted(self.variants.items())}
        return out


@dataclass
class _Shopper:
    user: int
    recent: int | None
    next_page: int | None = None
    last_ms: int = 0
    """Event time of her newest event: her next one is dated later, even within the same millisecond."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def stamp(self, now_ms: int) -> int:
        self.last_ms = max(now_ms, self.last_ms + 1)
        return self.last_ms


def last_items(table: synthetic.EventTable, n_users: int) -> list[int | None]:
    """Each storefront user's most recent item in the generated events (None without events)."""
    last: list[int | None] = [None] * n_users
    users = np.char.lstrip(table.user_id.astype(str), "u").astype(np.int64)
    items = np.char.lstrip(table.item_id.astype(str), "i").astype(np.int64)
    for u, i in zip(users.tolist(), items.tolist(), strict=True):  # sorted by time: the last one wins
        last[u] = i
    return last


def arrival_offsets(rate: float, duration_s: float, arrivals: str, rng: np.random.Generator) -> np.ndarray:
    """Seconds from the start at which visits are due: Poisson (exponential gaps) or evenly spaced."""
    if arrivals == "constant":
        return np.arange(0, duration_s, 1 / rate)
    gaps = rng.exponential(1 / rate, size=int(rate * duration_s * 1.5) + 16)
    times = np.cumsum(gaps)
    while times[-1] < duration_s:
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1 / rate, size=len(times)))])
    return times[times < duration_s]


class Simulation:
    def __init__(self, settings: Settings, config: SimulationConfig) -> None:
        self.settings = settings
        self.config = config
        cfg = synthetic.preset(config.preset, seed=config.storefront_seed)
        self.model = ShopperModel(synthetic.storefront(cfg), config.params)
        n_users = self.model.n_users if config.users is None else min(config.users, self.model.n_users)
        recent = last_items(synthetic.generate(cfg), self.model.n_users)
        self.shoppers = [_Shopper(u, recent[u]) for u in range(n_users)]
        lookback_s = settings.outcomes.dedupe_window_s
        if config.pre_period.enabled and config.pre_period.span_ms > lookback_s * 1000:
            raise ValueError(f"the pre-period ({config.pre_period.days:g} days) is longer than the outcome service's look-back "
                             f"(outcomes.dedupe_window_s = {lookback_s} s): its oldest events would not be counted")
        self.report = SimulationReport(run_id=uuid.uuid4().hex[:10], users=n_users)
        self._event_number = 0

    def user_id(self, user: int) -> str:
        return f"{self.config.user_prefix}u{user}"

    def _event(self, user: int, item: int | str, kind: EventType, ts_ms: int, tag: str = "") -> Event:
        self._event_number += 1
        item_id = item if isinstance(item, str) else f"i{item}"
        return Event(event_id=f"sim-{self.report.run_id}-{tag}{self._event_number}", user_id=self.user_id(user),
                     item_id=item_id, type=kind, ts_ms=ts_ms)

    def visitors(self, due: int, rng: np.random.Generator) -> np.ndarray:
        """The shopper of each of `due` visits: drawn in proportion to the shoppers' activity."""
        activity = self.model.activity[: len(self.shoppers)]
        return rng.choice(len(self.shoppers), size=due, p=activity / activity.sum())

    def pre_period(self, users: list[int], first_visit_ms: int) -> list[Event]:
        """The pre-period events of `users` (ids "sim-<run>-h<n>"), each shopper's dated before `first_visit_ms`;
        moves each shopper's recent item to her last pre-period page. Same seed, same events."""
        out: list[Event] = []
        for user in users:
            shopper = self.shoppers[user]
            rng = np.random.default_rng([self.config.seed, 0x9E, user])
            history = self.model.pre_period(user, shopper.recent, first_visit_ms, self.config.pre_period, rng)
            out += [self._event(user, item, kind, ts, tag="h") for item, kind, ts in history]
            views = [item for item, kind, _ in history if kind == EventType.VIEW]
            if views:
                shopper.recent = views[-1]
        return out

    async def run(self, progress: Callable[[int, int], None] | None = None) -> SimulationReport:
        """Run the schedule; `progress(done, due)` is called as visits finish."""
        cfg, report = self.config, self.report
        rng = np.random.default_rng(cfg.seed)
        due = arrival_offsets(cfg.rate, cfg.duration_s, cfg.arrivals, rng)
        report.visits_due = len(due)
        chosen = self.visitors(len(due), rng)
        done = 0

        async with EventSink(self.settings.kafka.bootstrap_servers, cfg.topic) as sink, \
                GatewayClient(self.settings.gateway.address, cfg.api_key) as client:
            if cfg.pre_period.enabled:
                began = time.monotonic()
                shoppers = sorted(set(chosen.tolist()))
                for event in self.pre_period(shoppers, int(time.time() * 1000)):
                    await self._send(sink, event)
                    report.pre_period[event.type.value] += 1
                await sink.flush()  # acknowledged before any request: dated and sent before every exposure
                report.pre_period_shoppers = len(shoppers)
                report.pre_period_s = time.monotonic() - began
            tasks: set[asyncio.Task] = set()

            def finished(task: asyncio.Task) -> None:
                nonlocal done
                tasks.discard(task)
                done += 1
                if progress is not None:
                    progress(done, len(due))

            start = time.monotonic()
            for number, (offset, user) in enumerate(zip(due.tolist(), chosen.tolist(), strict=True)):
                wait = start + offset - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                else:
                    report.max_behind_s = max(report.max_behind_s, -wait)
                if len(tasks) >= cfg.max_in_flight:
                    report.skipped += 1
                    done += 1
                    continue
                task = asyncio.create_task(self._visit(number, self.shoppers[user], client, sink))
                tasks.add(task)
                task.add_done_callback(finished)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await sink.flush()
            report.seconds = time.monotonic() - start
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
        return report

    async def _visit(self, number: int, shopper: _Shopper, client: GatewayClient, sink: EventSink) -> None:
        cfg, report = self.config, self.report
        rng = np.random.default_rng([cfg.seed, number])
        async with shopper.lock:
            page = shopper.next_page if shopper.next_page is not None else self.model.own_next(shopper.user, shopper.recent, rng)
            shopper.recent, shopper.next_page = page, None
            await self._send(sink, self._event(shopper.user, page, EventType.VIEW, shopper.stamp(int(time.time() * 1000))))
            if cfg.dwell_s:
                await asyncio.sleep(cfg.dwell_s)
            try:
                reply = await client.recommend(self.user_id(shopper.user), cfg.k, page=PAGE, item_id=f"i{page}",
                                               timeout_s=cfg.timeout_s, request_id=f"sim-{report.run_id}-{number}")
            except grpc.aio.AioRpcError as exc:
                report.errors[exc.code().name] += 1
                return
            report.requests += 1
            shown = [i.item_id for i in reply.items]
            reaction = self.model.react(shopper.user, page, shown, rng)
            self._tally(reply, shopper.user, page, shown, reaction.clicked, reaction.carted, reaction.purchased)
            now_ms = int(time.time() * 1000)
            for item, kind in reaction.events():
                await self._send(sink, self._event(shopper.user, item, kind, shopper.stamp(now_ms)))
            if reaction.clicked:
                shopper.next_page = item_index(reaction.clicked[0], self.model.storefront.n_items)

    async def _send(self, sink: EventSink, event: Event) -> None:
        await sink.send(event)
        self.report.events[event.type.value] += 1

    def _tally(self, reply, user: int, page: int, shown: list[str], clicked: list[str],  # noqa: ANN001
               carted: list[str], purchased: list[str]) -> None:
        probs = self.model.click_probabilities(user, page, shown)
        teams = [i.variant for i in reply.items]
        if any(teams):  # interleaving: credit each slot's owner
            per_team: Counter = Counter()
            for n, (item, team) in enumerate(zip(shown, teams, strict=True)):
                tally = self.report.variants[team]
                tally.impressions += 1
                tally.expected_clicks += float(probs[n])
                if item in clicked:
                    tally.clicks += 1
                    per_team[team] += 1
                tally.add_to_carts += item in carted
                tally.purchases += item in purchased
            for team in set(teams):
                tally = self.report.variants[team]
                tally.requests += 1
                tally.requests_with_click += per_team[team] > 0
                tally.degraded += reply.degraded
                tally.models[reply.model_name] += 1
            if per_team:
                ranked = per_team.most_common()
                tie = len(ranked) > 1 and ranked[0][1] == ranked[1][1]
                self.report.interleaved["tie" if tie else ranked[0][0]] += 1
            return
        tally = self.report.variants[reply.variant]
        tally.requests += 1
        tally.impressions += len(shown)
        tally.clicks += len(clicked)
        tally.add_to_carts += len(carted)
        tally.purchases += len(purchased)
        tally.requests_with_click += bool(clicked)
        tally.degraded += reply.degraded
        tally.expected_clicks += float(probs.sum())
        tally.models[reply.model_name] += 1


def ctr_interval(clicks: int, impressions: int) -> tuple[float, float]:
    """Wilson 95 % interval of clicks / impressions, treating impressions as independent (a rough guide
    for the simulator's own summary; the experiment report analyses per user with the delta method)."""
    from statsmodels.stats.proportion import proportion_confint

    if not impressions:
        return 0.0, 0.0
    low, high = proportion_confint(clicks, impressions, alpha=0.05, method="wilson")
    return float(low), float(high)


def render(report: SimulationReport) -> str:
    lines = [f"run {report.run_id}: {report.requests:,} requests of {report.visits_due:,} visits due in {report.seconds:.1f}s, "
             f"{report.users:,} shoppers · events to Kafka {report.events_sent:,} ({', '.join(f'{k} {v:,}' for k, v in sorted(report.events.items()))})"]
    if report.pre_period_shoppers:
        lines.append(f"pre-period: {sum(report.pre_period.values()):,} events of {report.pre_period_shoppers:,} shoppers dated in the days "
                     f"before the run ({', '.join(f'{k} {v:,}' for k, v in sorted(report.pre_period.items()))}), sent in {report.pre_period_s:.1f}s")
    if report.errors or report.skipped:
        lines.append(f"errors by code: {dict(report.errors) or 'none'} · skipped (client fell behind): {report.skipped:,}")
    header = f"  {'variant':<14} {'model':<18} {'requests':>8} {'impr.':>7} {'clicks':>6} {'CTR':>7} {'95% interval':>17} {'exp. CTR':>8} {'carts':>5} {'buys':>5} {'degraded':>8}"
    lines.append(header)
    for name, t in sorted(report.variants.items()):
        low, high = ctr_interval(t.clicks, t.impressions)
        models = ",".join(m for m, _ in t.models.most_common(2))
        lines.append(f"  {name:<14} {models:<18} {t.requests:>8,} {t.impressions:>7,} {t.clicks:>6,} {t.ctr:>7.2%} "
                     f"{f'[{low:.2%}, {high:.2%}]':>17} {t.expected_ctr:>8.2%} {t.add_to_carts:>5,} {t.purchases:>5,} {t.degraded:>8,}")
    if report.interleaved:
        lines.append(f"  interleaving: requests won by team {dict(report.interleaved)}")
    return "\n".join(lines)
