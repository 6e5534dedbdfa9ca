"""The simulated shopper's choice model and the simulation loop, without services (a fake gateway and sink)."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter

import numpy as np
import pytest

from vitrine.contracts.events import EventType
from vitrine.export.data import synthetic
from vitrine.services.simulator import runner
from vitrine.services.simulator.runner import Simulation, SimulationConfig, arrival_offsets, last_items
from vitrine.services.simulator.shopper import DAY_MS, ChoiceParams, PrePeriod, Reaction, ShopperModel, item_index, position_bias
from vitrine.settings import Settings
from vitrine.v1 import recommender_pb2 as pb


@pytest.fixture(scope="module")
def small() -> synthetic.Storefront:
    return synthetic.storefront(synthetic.preset("small"))


@pytest.fixture(scope="module")
def model(small: synthetic.Storefront) -> ShopperModel:
    return ShopperModel(small)


def _top_category(sf: synthetic.Storefront, user: int) -> int:
    return int(np.argmax(sf.affinities[user]))


def _items_by_kind(sf: synthetic.Storefront, user: int, page: int) -> tuple[str, str, str]:
    """A successor of `page`, a non-successor of the user's favourite category, an item of her least liked category."""
    favourite, least = _top_category(sf, user), int(np.argmin(sf.affinities[user]))
    successor = f"i{sf.successors[page][int(np.argmax(sf.successor_weights[page]))]}"
    same = next(f"i{i}" for i in sf.catalog.by_category[favourite] if i != page and i not in sf.successors[page])
    other = next(f"i{i}" for i in sf.catalog.by_category[least] if i not in sf.successors[page])
    return successor, same, other


def test_storefront_is_the_ground_truth_of_generate() -> None:
    """Independent check of the exposed truth: the generated sessions step to a successor about as often as
    `transition_prob` says, and users' views fall in their categories as their affinities say. Missions (whose
    routes lead outside a shopper's affinities, which the simulator does not model) and repeat purchases are off."""
    cfg = synthetic.preset("small", transition_prob=0.65, missions=1, mission_move_prob=0.0, repeat_prob=0.0)
    sf, table = synthetic.storefront(cfg), synthetic.generate(cfg)
    assert sf.n_items == cfg.n_items and sf.affinities.shape == (cfg.n_users, cfg.n_categories)
    assert all(abs(sum(w) - 1) < 1e-9 for w in sf.successor_weights)
    views = table.type == 0
    users, items = table.user_id[views].tolist(), table.item_id[views].tolist()
    steps = successors = 0
    liked = Counter()
    for (u1, i1), (u2, i2) in zip(zip(users, items), zip(users[1:], items[1:])):  # time-sorted: same user, next view
        if u1 == u2:
            steps += 1
            successors += int(i2[1:]) in sf.successors[int(i1[1:])]
    for u, i in zip(users, items):
        liked[sf.affinities[int(u[1:]), sf.category[int(i[1:])]] >= 0.05] += 1
    assert steps > 1000
    assert successors / steps > 0.5 * cfg.transition_prob  # sessions interleave in time, so a lower bound
    assert liked[True] / sum(liked.values()) > 0.9


def test_generate_is_unchanged_by_exposing_the_storefront() -> None:
    cfg = synthetic.preset("tiny")
    first, again = synthetic.generate(cfg), synthetic.generate(cfg)
    synthetic.storefront(cfg)
    assert first.item_id.tolist() == again.item_id.tolist() == synthetic.generate(cfg).item_id.tolist()
    # The first draw of the catalogue equals the storefront's (same generator state).
    table_items = {int(i[1:]) for i in first.item_id.tolist()}
    assert max(table_items) < synthetic.storefront(cfg).n_items


def test_relevance_orders_successor_then_favourite_category_then_the_rest(small: synthetic.Storefront, model: ShopperModel) -> None:
    for user in range(20):
        page = int(small.catalog.by_category[_top_category(small, user)][0])
        successor, same, other = _items_by_kind(small, user, page)
        r = [model.relevance(user, page, i) for i in (successor, same, other)]
        assert r[0] > r[1] > r[2], (user, r)
        assert model.relevance(user, page, successor) >= model.params.successor_weight * 0.5
        p = model.click_probabilities(user, page, [successor, same, other])
        # Same slot for each: the probabilities follow relevance exactly (times the shopper's activity, capped at 1).
        for item, rel in zip((successor, same, other), r):
            assert model.click_probabilities(user, page, [item])[0] == pytest.approx(
                min(1.0, model.activity[user] * (model.params.floor + (model.params.ceiling - model.params.floor) * rel)))
        assert p[0] > p[2]


def test_unknown_items_get_the_floor(model: ShopperModel) -> None:
    for item in ("x1", "i", "i99999999", "ia", ""):
        assert item_index(item, model.storefront.n_items) is None
        assert model.relevance(0, 1, item) == 0.0
    assert model.click_probabilities(0, 1, ["nope"])[0] == pytest.approx(model.activity[0] * model.params.floor)


def test_position_bias_discounts_later_slots(model: ShopperModel, small: synthetic.Storefront) -> None:
    assert [position_bias(p) for p in range(4)] == pytest.approx([1, 1 / math.log2(3), 0.5, 1 / math.log2(5)])
    with pytest.raises(ValueError):
        position_bias(-1)
    user, page = 3, 5
    item = f"i{small.successors[page][0]}"
    probs = model.click_probabilities(user, page, [item] * 8)
    assert np.all(np.diff(probs) < 0)
    assert probs / probs[0] == pytest.approx([position_bias(p) for p in range(8)])


def test_same_seed_same_reaction_and_seeds_differ(model: ShopperModel, small: synthetic.Storefront) -> None:
    user, page = 7, 11
    shown = [f"i{i}" for i in small.successors[page]] + [f"i{i}" for i in range(20, 26)]
    a = [model.react(user, page, shown, np.random.default_rng([1, n])) for n in range(200)]
    b = [model.react(user, page, shown, np.random.default_rng([1, n])) for n in range(200)]
    c = [model.react(user, page, shown, np.random.default_rng([2, n])) for n in range(200)]
    assert a == b
    assert a != c
    assert sum(len(r.clicked) for r in a) > 0


def test_reaction_events_go_down_the_funnel() -> None:
    reaction = Reaction(clicked=["i1", "i2", "i3"], carted=["i2", "i3"], purchased=["i3"])
    assert reaction.events() == [("i1", EventType.CLICK), ("i2", EventType.CLICK), ("i2", EventType.ADD_TO_CART),
                                 ("i3", EventType.CLICK), ("i3", EventType.ADD_TO_CART), ("i3", EventType.PURCHASE)]


def _simulated_ctr(model: ShopperModel, ranker, shoppers: int, k: int, seed: int) -> float:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    clicks = 0
    for n in range(shoppers):
        user = int(rng.integers(model.n_users))
        page = model.own_next(user, None, rng)
        shown = ranker(user, page)[:k]
        clicks += len(model.react(user, page, shown, np.random.default_rng([seed, n])).clicked)
    return clicks / (shoppers * k)


def test_a_better_ranking_earns_a_higher_ctr(model: ShopperModel, small: synthetic.Storefront) -> None:
    """Simulated shoppers, three rankers over the same catalogue: the personalised ranking (what the
    storefront's sessions do next) beats global popularity by far, and the same personalised items in
    reverse order earn less than in the right order (position bias)."""
    k = 10
    popular = [f"i{i}" for i in np.argsort(-small.popularity)]
    everything = [f"i{i}" for i in range(small.n_items)]

    def personalised(user: int, page: int) -> list[str]:
        return sorted((i for i in everything if i != f"i{page}"), key=lambda i: -model.relevance(user, page, i))

    def by_popularity(user: int, page: int) -> list[str]:
        return [i for i in popular if i != f"i{page}"]

    def reversed_personal(user: int, page: int) -> list[str]:
        return personalised(user, page)[:k][::-1]

    ctr = {name: _simulated_ctr(model, ranker, 600, k, seed=5)
           for name, ranker in (("personal", personalised), ("popularity", by_popularity), ("reversed", reversed_personal))}
    # Binomial standard errors at these CTRs and 6,000 impressions are ≤ 0.5 points: margins of several errors.
    assert ctr["personal"] > 2 * ctr["popularity"] + 0.02, ctr
    assert ctr["personal"] > ctr["reversed"] + 0.01, ctr


def test_arrivals_open_loop_schedule() -> None:
    rng = np.random.default_rng(0)
    constant = arrival_offsets(10, 3, "constant", rng)
    assert len(constant) == 30 and constant[1] - constant[0] == pytest.approx(0.1)
    poisson = arrival_offsets(200, 50, "poisson", rng)
    assert abs(len(poisson) - 10_000) < 5 * 100  # Poisson(10,000): sd 100
    assert np.all(np.diff(poisson) > 0) and poisson[-1] < 50
    gaps = np.diff(poisson)
    assert gaps.std() / gaps.mean() == pytest.approx(1, abs=0.05)  # exponential gaps: cv 1


def test_last_items_are_each_users_most_recent() -> None:
    table = synthetic.generate(synthetic.preset("tiny"))
    last = last_items(table, 60)
    expected: dict[str, str] = {}
    for u, i in zip(table.user_id.tolist(), table.item_id.tolist()):
        expected[u] = i
    assert {f"u{u}": f"i{i}" for u, i in enumerate(last) if i is not None} == expected


class _FakeClient:
    """The gateway's part: A/B by user parity, control = popularity order, treatment = the storefront's truth."""

    def __init__(self, model: ShopperModel) -> None:
        self.model = model
        self.requests: list[tuple[str, str]] = []
        self.popular = [f"i{i}" for i in np.argsort(-model.storefront.popularity)]

    async def recommend(self, user_id: str, k: int, page: str, item_id: str, timeout_s: float, request_id: str) -> pb.RecommendResponse:
        self.requests.append((user_id, request_id))
        user, page_item = int(user_id.rsplit("u", 1)[1]), int(item_id[1:])
        if user % 2:
            items = sorted((f"i{i}" for i in range(self.model.storefront.n_items) if i != page_item),
                           key=lambda i: -self.model.relevance(user, page_item, i))[:k]
            variant, name = "treatment", "oracle"
        else:
            items, variant, name = [i for i in self.popular if i != item_id][:k], "control", "popularity"
        return pb.RecommendResponse(items=[pb.ScoredItem(item_id=i, score=1.0) for i in items], variant=variant,
                                    model_name=name, request_id=request_id)

    async def __aenter__(self) -> _FakeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class _FakeSink:
    def __init__(self) -> None:
        self.events = []

    async def send(self, event) -> None:  # noqa: ANN001
        self.events.append(event)

    async def flush(self) -> int:
        return len(self.events)

    async def __aenter__(self) -> _FakeSink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_the_loop_reports_what_it_sent_and_the_better_arm_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    config = SimulationConfig(rate=400, duration_s=2, seed=3, k=8, dwell_s=0, preset="small", storefront_seed=7, user_prefix="t-")
    simulation = Simulation(Settings(), config)
    client, sink = _FakeClient(simulation.model), _FakeSink()
    monkeypatch.setattr(runner, "GatewayClient", lambda address, key: client)
    monkeypatch.setattr(runner, "EventSink", lambda servers, topic: sink)
    done: list[int] = []
    report = await asyncio.wait_for(simulation.run(lambda n, due: done.append(n)), timeout=60)

    assert report.requests == len(client.requests) == report.visits_due == done[-1] and report.skipped == 0
    ids = [e.event_id for e in sink.events]
    assert len(ids) == len(set(ids)) == report.events_sent
    assert Counter(e.type.value for e in sink.events) == report.events
    assert report.events["view"] - report.pre_period["view"] == report.requests
    assert "click" not in report.pre_period and report.pre_period_shoppers == len({u for u, _ in client.requests})
    tallied = sum(t.clicks for t in report.variants.values())
    assert tallied == report.events["click"] and report.events["purchase"] - report.pre_period["purchase"] == sum(t.purchases for t in report.variants.values())
    assert all(e.user_id.startswith("t-u") for e in sink.events)
    # Per shopper, events are in time order (the pre-period first) and every visit starts with a view of the page asked about.
    by_user: dict[str, list] = {}
    for e in sink.events:
        by_user.setdefault(e.user_id, []).append(e)
    assert all([e.ts_ms for e in es] == sorted(e.ts_ms for e in es) for es in by_user.values())
    control, treatment = report.variants["control"], report.variants["treatment"]
    assert control.requests + treatment.requests == report.requests
    assert treatment.ctr > 2 * control.ctr, (treatment.ctr, control.ctr)
    assert "treatment" in runner.render(report) and report.to_dict()["variants"]["control"]["ctr"] == control.ctr


def test_choice_params_are_validated() -> None:
    with pytest.raises(ValueError):
        ChoiceParams(floor=0.6, ceiling=0.5)
    with pytest.raises(ValueError):
        ChoiceParams(successor_weight=1.5)
    with pytest.raises(ValueError):
        SimulationConfig(rate=0)
    with pytest.raises(ValueError):
        SimulationConfig(arrivals="bursty")


@pytest.mark.parametrize("args", [["--rate", "0"], ["--duration", "0"], ["--k", "0"], ["--dwell", "-1"], ["--arrivals", "bursty"],
                                  ["--preset", "nope"], ["--user-prefix", "a b"], ["--users", "0"], ["--timeout", "0"],
                                  ["--pre-events", "-1"], ["--pre-days", "0"], ["--pre-days", "8"], ["--activity-sd", "-0.5"],
                                  ["--activity-sd", "3"]])
def test_simulate_flags_are_validated(args: list[str]) -> None:
    from typer.testing import CliRunner

    from vitrine.cli import app

    result = CliRunner().invoke(app, ["simulate", *args])
    assert result.exit_code == 2, result.output


# --- the pre-period: each shopper's history before the run, the CUPED covariate ------------------------------------
FIRST_VISIT_MS = 1_800_000_000_000


def test_the_pre_period_is_dated_before_the_first_visit_within_the_look_back(model: ShopperModel) -> None:
    """Every event lies in [first visit − days, first visit − gap], in time order, and none is a click (a click is on a
    recommendation, and there were none before the run); the sessions spread over the days rather than bunch up."""
    config = PrePeriod(events=10, days=3, gap_s=120)
    lookback_ms = Settings().outcomes.dedupe_window_s * 1000
    stamps = []
    for user in range(300):
        history = model.pre_period(user, None, FIRST_VISIT_MS, config, np.random.default_rng([1, user]))
        times = [ts for _, _, ts in history]
        assert times == sorted(times)
        assert all(FIRST_VISIT_MS - config.span_ms <= ts <= FIRST_VISIT_MS - 120_000 for ts in times), user
        assert all(FIRST_VISIT_MS - ts < lookback_ms for ts in times)
        assert {kind for _, kind, _ in history} <= {EventType.VIEW, EventType.ADD_TO_CART, EventType.PURCHASE}
        assert all(item_index(f"i{item}", model.storefront.n_items) is not None for item, _, _ in history)
        stamps += times
    assert len(stamps) > 2000
    ages_days = (FIRST_VISIT_MS - np.array(stamps)) / DAY_MS
    assert np.histogram(ages_days, bins=3, range=(0, 3))[0].min() > 0.25 * len(stamps)  # about a third each day
    assert model.pre_period(0, None, FIRST_VISIT_MS, PrePeriod(events=0), np.random.default_rng(0)) == []
    # A pre-period of 15 minutes: sessions (steps ~25 s apart) that start near its end still end before the gap.
    short = PrePeriod(events=10, days=15 / 1440, gap_s=120)
    for user in range(100):
        times = [ts for _, _, ts in model.pre_period(user, None, FIRST_VISIT_MS, short, np.random.default_rng([3, user]))]
        assert all(FIRST_VISIT_MS - short.span_ms <= ts <= FIRST_VISIT_MS - 120_000 for ts in times), user


def test_the_pre_period_size_follows_the_shoppers_click_propensity(small: synthetic.Storefront) -> None:
    """Over the storefront's 800 shoppers, the number of pre-period events correlates with how much each shopper
    clicks in the run (expected clicks on the same list at the same page, so only the shopper differs): the link
    CUPED exploits. Without a shared activity (pre-period size or clicks independent of it), ρ ≈ 0."""
    model = ShopperModel(small)
    shown = [f"i{i}" for i in np.argsort(-small.popularity)[:10]]
    sizes, clicks = [], []
    for user in range(model.n_users):
        sizes.append(len(model.pre_period(user, None, FIRST_VISIT_MS, PrePeriod(), np.random.default_rng([2, user]))))
        clicks.append(model.expected_clicks(user, 0, shown))
    rho = float(np.corrcoef(sizes, clicks)[0, 1])
    assert rho > 0.3, rho
    assert np.mean(sizes) == pytest.approx(PrePeriod().events, rel=0.1)  # activity has mean 1
    # All alike (activity_sd 0): nothing to exploit.
    flat = ShopperModel(small, ChoiceParams(activity_sd=0))
    assert np.all(flat.activity == 1)
    flat_sizes = [len(flat.pre_period(u, None, FIRST_VISIT_MS, PrePeriod(), np.random.default_rng([2, u]))) for u in range(flat.n_users)]
    assert abs(float(np.corrcoef(flat_sizes, [flat.expected_clicks(u, 0, shown) for u in range(flat.n_users)])[0, 1])) < 0.15


def test_cuped_gains_from_the_pre_period_in_simulation(small: synthetic.Storefront) -> None:
    """The simulator's rows as the outcome service would store them (pre_events = pre-period + the first visit's view),
    analysed by `analyse`: CUPED removes a good share of the CTR's variance; with shoppers all alike, none."""
    from vitrine.experiments.analysis import analyse
    from vitrine.services.outcomes.store import UserOutcome

    popular = [f"i{i}" for i in np.argsort(-small.popularity)]

    def ctr_variance_reduction(activity_sd: float) -> float:
        model = ShopperModel(small, ChoiceParams(activity_sd=activity_sd))
        rng = np.random.default_rng(4)
        activity = model.activity[:300]
        rows: dict[int, dict[str, int]] = {}
        for visit, user in enumerate(rng.choice(300, size=900, p=activity / activity.sum()).tolist()):
            row = rows.setdefault(user, Counter(pre_events=1 + len(model.pre_period(
                user, None, FIRST_VISIT_MS, PrePeriod(), np.random.default_rng([4, user])))))
            page = model.own_next(user, None, rng)
            reaction = model.react(user, page, [i for i in popular if i != f"i{page}"][:10], np.random.default_rng([4, visit]))
            row.update(exposures=1, impressions=10, clicks=len(reaction.clicked), purchases=len(reaction.purchased))
        outcomes = [UserOutcome(user_id=f"u{u}", variant=("control", "treatment")[u % 2], add_to_carts=0, **r) for u, r in rows.items()]
        ctr = next(c for c in analyse(outcomes, {"control": 50, "treatment": 50}, "control").comparisons if c.metric == "ctr")
        return ctr.cuped.variance_reduction

    assert ctr_variance_reduction(0.7) > 0.08
    assert ctr_variance_reduction(0.0) < 0.03


def test_the_pre_period_is_deterministic_under_a_seed() -> None:
    def events(seed: int) -> list[tuple]:
        simulation = Simulation(Settings(), SimulationConfig(seed=seed, preset="tiny", user_prefix="d-"))
        return [(e.user_id, e.item_id, e.type, e.ts_ms) for e in simulation.pre_period(list(range(50)), FIRST_VISIT_MS)]

    first = events(5)
    assert first and first == events(5)
    assert first != events(6)
    # The storefront fixes each user's activity (her seed), the run's seed only her draws.
    a = Simulation(Settings(), SimulationConfig(seed=5, preset="tiny")).model.activity
    assert np.array_equal(a, Simulation(Settings(), SimulationConfig(seed=6, preset="tiny")).model.activity)


async def test_the_loop_sends_the_pre_period_before_any_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """In the loop: every shopper who visits has her pre-period acknowledged before the first request of the run,
    dated before her own first request; nobody else gets one; busier shoppers visit more often."""
    config = SimulationConfig(rate=400, duration_s=1.5, seed=8, k=6, dwell_s=0, preset="small", user_prefix="p-")
    simulation = Simulation(Settings(), config)
    order: list[tuple[str, object]] = []
    client, sink = _FakeClient(simulation.model), _FakeSink()
    real_recommend, real_flush = client.recommend, sink.flush

    async def recommend(user_id: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        order.append(("request", (user_id, int(time.time() * 1000))))
        return await real_recommend(user_id, *args, **kwargs)

    async def flush() -> int:
        order.append(("flush", len(sink.events)))
        return await real_flush()

    client.recommend, sink.flush = recommend, flush
    monkeypatch.setattr(runner, "GatewayClient", lambda address, key: client)
    monkeypatch.setattr(runner, "EventSink", lambda servers, topic: sink)
    report = await asyncio.wait_for(simulation.run(), timeout=60)

    history = [e for e in sink.events if e.event_id.startswith(f"sim-{report.run_id}-h")]
    assert len(history) == sum(report.pre_period.values()) > 0
    first_request = next(n for n, (what, _) in enumerate(order) if what == "request")
    assert ("flush", len(history)) in order[:first_request]  # all of it sent and flushed before the first request
    assert sink.events[: len(history)] == history
    first_ms: dict[str, int] = {}
    for what, value in order:
        if what == "request":
            first_ms.setdefault(value[0], value[1])
    assert {e.user_id for e in history} <= set(first_ms) and report.pre_period_shoppers == len(first_ms)
    assert all(e.ts_ms < first_ms[e.user_id] - config.pre_period.gap_s * 1000 for e in history)
    assert all(e.ts_ms > first_ms[e.user_id] - config.pre_period.span_ms - 60_000 for e in history)
    visits = Counter(value[0] for what, value in order if what == "request")
    busy = [visits[simulation.user_id(u)] for u in np.argsort(-simulation.model.activity)[:100]]
    idle = [visits[simulation.user_id(u)] for u in np.argsort(simulation.model.activity)[:100]]
    assert sum(busy) > 3 * sum(idle)


def test_pre_period_settings_are_validated() -> None:
    for bad in (dict(events=-1), dict(days=0), dict(days=1, gap_s=86400), dict(gap_s=-1)):
        with pytest.raises(ValueError):
            PrePeriod(**bad)
    with pytest.raises(ValueError):
        ChoiceParams(activity_sd=-0.1)
    with pytest.raises(ValueError, match="look-back"):  # older than the outcome service would count
        Simulation(Settings(), SimulationConfig(preset="tiny", pre_period=PrePeriod(days=8)))
    Simulation(Settings(), SimulationConfig(preset="tiny", pre_period=PrePeriod(events=0, days=8)))  # off: no limit
