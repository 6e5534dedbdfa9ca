"""A synthetic storefront that is realistic enough to learn from, and reproducible from a seed.

What makes it learnable beyond popularity, as real shops are:
- items belong to categories and have power-law (Zipf) popularity;
- users have sparse category affinities (Dirichlet), so histories say what a user likes;
- within a session shoppers follow item-to-item paths ("customers who viewed this next viewed…"):
  with `transition_prob` the next item is one of the current item's few successors;
- each viewed item may go down the funnel view → click → add_to_cart → purchase;
- optional drift: from `drift_at_ms` on, a new item line appears and takes `drift_share` of sessions.

What makes it more than a transition table — structure that a model of the whole history can learn
and a first-order counter cannot, as in real shops (issue 14; `first_order` is the storefront without it):
- *shopping missions* (longer-range intent): each session pursues one of `missions` missions, drawn
  from the shopper's own mission preferences (Dirichlet `mission_concentration`: most shoppers stick
  to one). When a session leaves the item path (1 - `transition_prob`), with `mission_move_prob` it
  follows its mission's route: mission m maps the current category c to its own next category
  (the camera, then the lens, then the bag) and goes to one of that category's `route_items` best
  sellers. From the last item alone every mission's route is possible (`missions` × `route_items`
  candidates beside the item's successors); the shopper's earlier steps say which route she is on;
- *repeat purchases*: a share `consumable_share` of items are consumables; a session starts, with
  `repeat_prob`, by buying again one of the consumables this shopper bought before — a step that the
  previous item cannot predict but the history can;
- optionally, *affinity drift within a session* (`session_focus` > 0, off by default): the categories a
  session jumps to lean towards those it already visited.
The catalogue, the successors and the affinities do not depend on these settings. The shopper
simulator (`services/simulator/`) models relevance by successors and affinities only, not by missions.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from vitrine.export.data.table import EventTable

DAY_MS = 86_400_000
Preset = Literal["tiny", "small", "default", "wide", "large", "huge"]


@dataclass(frozen=True)
class StorefrontConfig:
    n_users: int = 4_000
    n_items: int = 2_000
    n_categories: int = 24
    sessions_per_user: float = 6.0
    """Poisson mean of sessions per user over the whole period."""
    steps_per_session: float = 7.0
    """Mean number of distinct items a session looks at (geometric)."""
    zipf_exponent: float = 1.05
    affinity_concentration: float = 0.15
    transition_prob: float = 0.45
    successors: int = 4
    click_prob: float = 0.35
    cart_prob: float = 0.3
    purchase_prob: float = 0.5
    start_ms: int = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    days: int = 28
    seconds_between_steps: float = 25.0
    drift_at_ms: int | None = None
    drift_items: int = 120
    drift_share: float = 0.5
    missions: int = 4
    """Shopping missions, each a route between categories (1 with `mission_move_prob` 0: none)."""
    mission_concentration: float = 0.1
    """Dirichlet concentration of a shopper's mission preferences (small: each sticks to one or two)."""
    mission_move_prob: float = 0.7
    """When a session leaves the item path: chance that it follows its mission's route."""
    route_items: int = 3
    """A route move goes to one of this many most popular items of the route's next category."""
    session_focus: float = 0.0
    """Weight added to each category visited in the session when an affinity move is drawn (0: off)."""
    consumable_share: float = 0.15
    """Share of items that are bought again (consumables)."""
    repeat_prob: float = 0.3
    """Chance that a session of a shopper who bought consumables starts by buying one of them again."""
    seed: int = 7

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "n_categories", "successors", "days", "missions", "route_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("transition_prob", "click_prob", "cart_prob", "purchase_prob", "drift_share", "mission_move_prob",
                     "consumable_share", "repeat_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1]")
        if self.sessions_per_user <= 0 or self.steps_per_session < 1:
            raise ValueError("sessions_per_user must be > 0 and steps_per_session >= 1")
        if self.mission_concentration <= 0 or self.session_focus < 0:
            raise ValueError("mission_concentration must be > 0 and session_focus >= 0")

    @property
    def end_ms(self) -> int:
        return self.start_ms + self.days * DAY_MS


PRESETS: dict[str, StorefrontConfig] = {
    # ~2k events: unit tests
    "tiny": StorefrontConfig(n_users=60, n_items=80, n_categories=4, sessions_per_user=3, days=7),
    # ~50k events: integration tests, a model in seconds
    "small": StorefrontConfig(n_users=800, n_items=400, n_categories=8, days=14),
    # ~300k events: the demo and the reference training run (minutes on 2 cores)
    "default": StorefrontConfig(),
    # ~106k events, ~9k items, 610 users with long histories (a MovieLens-shaped catalogue): the
    # training-speed benchmark of a large catalogue (docs/benchmarks.md, Training)
    "wide": StorefrontConfig(n_users=610, n_items=9_500, n_categories=60, sessions_per_user=22, days=180,
                             zipf_exponent=0.7, click_prob=0.1),
    # the default storefront with item-to-item paths and affinities only (no missions, drift within a
    # session or repeat purchases): a transition table is as good as a sequence model there
    "first_order": StorefrontConfig(transition_prob=0.65, missions=1, mission_move_prob=0.0, session_focus=0.0, repeat_prob=0.0),
    # ~2.5M events: load tests
    "large": StorefrontConfig(n_users=30_000, n_items=10_000, n_categories=60, sessions_per_user=8),
    # ~10M events
    "huge": StorefrontConfig(n_users=120_000, n_items=30_000, n_categories=120, sessions_per_user=8),
}


def preset(name: str, **overrides: object) -> StorefrontConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)  # type: ignore[arg-type]


class _Catalog:
    """Item categories, popularity and successor lists, drawn once from the seed."""

    def __init__(self, cfg: StorefrontConfig, rng: np.random.Generator) -> None:
        self.n_items = cfg.n_items + (cfg.drift_items if cfg.drift_at_ms is not None else 0)
        categories = rng.integers(0, cfg.n_categories, size=cfg.n_items)
        ranks = rng.permutation(cfg.n_items) + 1
        popularity = 1.0 / ranks.astype(float) ** cfg.zipf_exponent
        if cfg.drift_at_ms is not None:
            # The new line: its own category, popular from the start of the drift.
            categories = np.concatenate([categories, np.full(cfg.drift_items, cfg.n_categories)])
            new_popularity = 1.0 / (np.arange(cfg.drift_items) + 1.0) ** cfg.zipf_exponent
            popularity = np.concatenate([popularity, new_popularity * popularity.max()])
        self.category = categories
        self.popularity = popularity
        n_categories = cfg.n_categories + (1 if cfg.drift_at_ms is not None else 0)
        self.by_category: list[np.ndarray] = [np.flatnonzero(categories == c) for c in range(n_categories)]
        self.by_popularity: list[np.ndarray] = [items[np.argsort(-popularity[items], kind="stable")] for items in self.by_category]
        """Each category's items, most popular first (ties in id order): `top_of` draws from their heads."""
        self.cum_popularity: list[list[float]] = [
            list(itertools.accumulate(popularity[items])) for items in self.by_category
        ]
        self.successors: list[list[int]] = []
        self.successor_cum: list[list[float]] = []
        for item in range(self.n_items):
            pool = self.by_category[categories[item]]
            pool = pool[pool != item] if len(pool) > 1 else np.arange(cfg.n_items)
            weights = popularity[pool] / popularity[pool].sum()
            count = min(cfg.successors, len(pool))
            chosen = rng.choice(pool, size=count, replace=False, p=weights)
            self.successors.append([int(i) for i in chosen])
            self.successor_cum.append(list(itertools.accumulate(rng.dirichlet(np.ones(count)))))

    def popular_in(self, category: int, rnd: random.Random) -> int:
        cum = self.cum_popularity[category]
        if not cum:
            return rnd.randrange(self.n_items)
        return int(self.by_category[category][bisect.bisect_left(cum, rnd.random() * cum[-1])])

    def successor_of(self, item: int, rnd: random.Random) -> int:
        cum = self.successor_cum[item]
        return self.successors[item][min(bisect.bisect_left(cum, rnd.random() * cum[-1]), len(cum) - 1)]

    def top_of(self, category: int, n: int, rnd: random.Random) -> int:
        """One of the `n` most popular items of `category`, uniformly: a mission's target there."""
        ranked = self.by_popularity[category]
        if not len(ranked):
            return rnd.randrange(self.n_items)
        return int(ranked[rnd.randrange(min(n, len(ranked)))])


@dataclass(frozen=True)
class Storefront:
    """The ground truth behind `generate`'s events for one config and seed: what each item is and what each
    user likes. The shopper simulator (`services/simulator/`) reacts to recommendations with it."""

    config: StorefrontConfig
    category: np.ndarray
    """Category of each item (index = the number in the item id "i<n>")."""
    popularity: np.ndarray
    """Unnormalised Zipf weight of each item."""
    successors: list[list[int]]
    """Each item's few successors: where sessions go next with `transition_prob`."""
    successor_weights: list[list[float]]
    """Probability of each successor (parallel to `successors`, sums to 1)."""
    affinities: np.ndarray
    """(n_users, n_categories) category preferences of each user (rows sum to 1)."""
    catalog: _Catalog

    @property
    def n_items(self) -> int:
        return len(self.category)


def _draw(cfg: StorefrontConfig) -> tuple[np.random.Generator, _Catalog, np.ndarray]:
    """The catalogue and affinities, drawn first from the seed's generator (which `generate` goes on using)."""
    rng = np.random.default_rng(cfg.seed)
    catalog = _Catalog(cfg, rng)
    affinities = rng.dirichlet(np.full(cfg.n_categories, cfg.affinity_concentration), size=cfg.n_users)
    return rng, catalog, affinities


def storefront(cfg: StorefrontConfig) -> Storefront:
    """The storefront `generate(cfg)` draws its events from (same config and seed, same ground truth)."""
    _, catalog, affinities = _draw(cfg)
    weights = [list(np.diff(np.concatenate([[0.0], cum]))) for cum in catalog.successor_cum]
    return Storefront(config=cfg, category=catalog.category, popularity=catalog.popularity, successors=catalog.successors,
                      successor_weights=[[float(w) for w in ws] for ws in weights], affinities=affinities, catalog=catalog)


def generate(cfg: StorefrontConfig) -> EventTable:
    """All events of the configured storefront, sorted by time. Same config and seed, same events."""
    rng, catalog, affinities = _draw(cfg)
    rnd = random.Random(cfg.seed)
    affinity_cum = np.cumsum(affinities, axis=1)
    new_line = cfg.n_categories
    step_ms = cfg.seconds_between_steps * 1000
    continue_prob = 1.0 - 1.0 / cfg.steps_per_session

    users: list[int] = []
    items: list[int] = []
    kinds: list[int] = []
    times: list[int] = []

    def emit(user: int, item: int, kind: int, ts: float) -> None:
        users.append(user)
        items.append(item)
        kinds.append(kind)
        times.append(int(ts))

    # Missions, routes and consumables come from a stream of their own (the catalogue stays the same).
    extra = np.random.default_rng([cfg.seed, 1])
    mission_cum = np.cumsum(extra.dirichlet(np.full(cfg.missions, cfg.mission_concentration), size=cfg.n_users), axis=1)
    routes = np.stack([extra.permutation(cfg.n_categories) for _ in range(cfg.missions)])
    consumable = extra.random(catalog.n_items) < cfg.consumable_share

    def affinity_move(user: int, visited: list[int]) -> int:
        if cfg.session_focus > 0 and visited:
            weights = affinities[user].copy()
            np.add.at(weights, visited, cfg.session_focus / len(visited))
            return int(np.searchsorted(np.cumsum(weights), rnd.random() * weights.sum()))
        return int(np.searchsorted(affinity_cum[user], rnd.random() * affinity_cum[user][-1]))

    for user in range(cfg.n_users):
        # Sessions in time order, so that a repeat purchase always follows the first one.
        starts = sorted(cfg.start_ms + rnd.random() * (cfg.end_ms - cfg.start_ms - DAY_MS // 24)
                        for _ in range(max(1, int(rng.poisson(cfg.sessions_per_user)))))
        bought: list[int] = []
        for ts in starts:
            drifting = cfg.drift_at_ms is not None and ts >= cfg.drift_at_ms and rnd.random() < cfg.drift_share
            category = new_line if drifting else affinity_move(user, [])
            mission = int(np.searchsorted(mission_cum[user], rnd.random() * mission_cum[user][-1])) if cfg.missions > 1 else 0
            repeat = cfg.repeat_prob > 0 and bool(bought) and rnd.random() < cfg.repeat_prob
            item = bought[rnd.randrange(len(bought))] if repeat else catalog.popular_in(category, rnd)
            visited = [int(catalog.category[item])] if not drifting else []
            while True:
                emit(user, item, 0, ts)
                depth = 0
                for kind, prob in ((1, cfg.click_prob), (2, cfg.cart_prob), (3, cfg.purchase_prob)):
                    if depth != kind - 1 or (not repeat and rnd.random() >= prob):
                        break  # a repeat purchase goes down the whole funnel
                    ts += rnd.expovariate(1 / (step_ms / 2))
                    emit(user, item, kind, ts)
                    depth = kind
                if depth == 3 and consumable[item] and item not in bought:
                    bought.append(item)
                repeat = False
                if rnd.random() >= continue_prob:
                    break
                ts += rnd.expovariate(1 / step_ms)
                if rnd.random() < cfg.transition_prob:
                    item = catalog.successor_of(item, rnd)
                else:
                    if not drifting:
                        here = int(catalog.category[item])
                        on_route = here < cfg.n_categories and rnd.random() < cfg.mission_move_prob
                        category = int(routes[mission][here]) if on_route else affinity_move(user, visited)
                        visited.append(category)
                        if on_route:
                            item = catalog.top_of(category, cfg.route_items, rnd)
                            continue
                    item = catalog.popular_in(category, rnd)

    user_arr = np.array(users, dtype=np.int64)
    item_arr = np.array(items, dtype=np.int64)
    table = EventTable(
        event_id=np.char.add(f"s{cfg.seed}-", np.arange(len(times)).astype(str)),
        user_id=np.char.add("u", user_arr.astype(str)),
        item_id=np.char.add("i", item_arr.astype(str)),
        type=np.array(kinds, dtype=np.int8),
        ts_ms=np.array(times, dtype=np.int64),
    )
    return table.sorted_by_time()
