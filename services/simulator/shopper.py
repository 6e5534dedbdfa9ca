"""The simulated shopper's choice model: how a shopper reacts to a list of recommended items.

The ground truth is the synthetic storefront the models were trained on (`export/data/synthetic.py`):
each user's category affinities and each item's successors ("customers who viewed this next viewed…").
A shopper on the page of item `page` is shown `items`; each shown item is clicked independently with

    P(click | item at position p) = position_bias(p) · (floor + (ceiling − floor) · relevance(item))

    relevance(item) = successor_weight · [item is a successor of `page`] · (½ + ½ · w(item) / max w)
                    + (1 − successor_weight) · affinity(user, category(item)) / max affinity(user)

    position_bias(p) = 1 / log2(p + 2)          (p = 0 for the first slot: 1, 0.63, 0.5, 0.43, …)

the examination model of click logs (a shopper looks at slot p with `position_bias(p)` and clicks
what she looks at with a probability that grows with relevance), with the logarithmic discount of
DCG (Järvelin & Kekäläinen 2002) as the examination curve. A clicked item goes down the storefront's
funnel: add to cart with `cart_prob · (½ + ½ · relevance)`, then purchase with `purchase_prob`.

Why a better model earns more clicks: relevance is exactly what the storefront's sessions were drawn
from — where a session goes next from `page` (its successors) and which categories the user browses
(affinities). A model that learned the next item from a user's history (GRU4Rec, SASRec) puts
successors of the current item and items of the user's categories at the top; popularity shows the
same global best-sellers to everyone, mostly from categories the user never visits. With the position
bias, *ordering* matters as well: the same items ranked by relevance earn more than ranked at random.

Shoppers differ in how active they are: each storefront user has a latent *activity* a_u, log-normal
with mean 1 and log-spread `activity_sd`, drawn once per storefront (its seed), so a user is as active
in every run. It multiplies her click probabilities (capped at 1), how often she visits during a run
(`runner.py` draws visitors in proportion to it) and how many events she had before the run
(`pre_period`): her history before the experiment predicts her clicks in it, as in a real shop — the
correlation CUPED exploits (`experiments/cuped.py`).

The pre-period (`pre_period`): before her first visit of a run, a shopper's Poisson(`events` · a_u)
storefront events of her own navigation (`own_next`: views, and down the storefront's funnel
add-to-carts and purchases; never a click, which is a click on a recommendation), in sessions whose
starts fall uniformly in the `days` before, the newest at least `gap_s` before her first visit: inside
the outcome service's look-back (`outcomes.dedupe_window_s`, 7 days), which counts them as the row's
`pre_events`.

Everything here is pure (no I/O): the runner (`runner.py`) feeds it what the gateway answered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vitrine.contracts.events import EventType
from vitrine.export.data.synthetic import Storefront


@dataclass(frozen=True)
class ChoiceParams:
    floor: float = 0.01
    """Click probability of an irrelevant item in the first slot."""
    ceiling: float = 0.5
    """Click probability of a perfectly relevant item in the first slot."""
    successor_weight: float = 0.5
    """Share of relevance that comes from being a successor of the page's item (the rest: category affinity)."""
    activity_sd: float = 0.7
    """σ of log(activity): how unequal shoppers are (0: all alike, activity 1)."""

    def __post_init__(self) -> None:
        if not 0 <= self.floor <= self.ceiling <= 1:
            raise ValueError("need 0 <= floor <= ceiling <= 1")
        if not 0 <= self.successor_weight <= 1:
            raise ValueError("successor_weight must lie in [0, 1]")
        if not 0 <= self.activity_sd <= MAX_ACTIVITY_SD:
            raise ValueError(f"activity_sd must lie in [0, {MAX_ACTIVITY_SD}]")


MAX_ACTIVITY_SD = 2.0
DAY_MS = 86_400_000


@dataclass(frozen=True)
class PrePeriod:
    """Each shopper's history before her first visit of a run (see the module docstring)."""

    events: float = 8.0
    """Mean number of events of a shopper of activity 1 (Poisson, times her activity); 0: no pre-period."""
    days: float = 6.0
    """Her sessions start uniformly in this many days before her first visit (at most the outcome service's look-back)."""
    gap_s: float = 60.0
    """Her newest pre-period event lies at least this long before her first visit."""

    def __post_init__(self) -> None:
        if not 0 <= self.events <= 10_000:
            raise ValueError("pre-period events must lie in [0, 10000]")
        if not 0 < self.days <= 60:
            raise ValueError("pre-period days must lie in (0, 60]")
        if not 0 <= self.gap_s < self.days * 86_400:
            raise ValueError("pre-period gap_s must be >= 0 and shorter than the pre-period")

    @property
    def enabled(self) -> bool:
        return self.events > 0

    @property
    def span_ms(self) -> int:
        """How far before the first visit the oldest pre-period event may lie."""
        return int(self.days * DAY_MS)


def latent_activity(n_users: int, sd: float, seed: int) -> np.ndarray:
    """Each user's activity: log-normal with mean 1 (log-mean −σ²/2), from a stream of its own."""
    rng = np.random.default_rng([seed, 0xAC7])
    return np.exp(sd * rng.standard_normal(n_users) - sd * sd / 2)


def position_bias(position: int) -> float:
    """Probability that a shopper examines slot `position` (0-based): 1 / log2(position + 2)."""
    if position < 0:
        raise ValueError("position must be >= 0")
    return 1.0 / math.log2(position + 2)


def item_index(item_id: str, n_items: int) -> int | None:
    """The storefront's item number of "i<n>", or None for an id the storefront does not know."""
    if len(item_id) < 2 or item_id[0] != "i" or not item_id[1:].isdigit():
        return None
    number = int(item_id[1:])
    return number if number < n_items else None


@dataclass(frozen=True)
class Reaction:
    """What one shopper did with one list: the items clicked, carted and bought (each in slot order)."""

    clicked: list[str]
    carted: list[str]
    purchased: list[str]

    def events(self) -> list[tuple[str, EventType]]:
        """The storefront events of this reaction, in funnel order per item."""
        out: list[tuple[str, EventType]] = []
        for item in self.clicked:
            out.append((item, EventType.CLICK))
            if item in self.carted:
                out.append((item, EventType.ADD_TO_CART))
                if item in self.purchased:
                    out.append((item, EventType.PURCHASE))
        return out


class ShopperModel:
    """Relevance, click probabilities and reactions of the storefront's users (see the module docstring)."""

    def __init__(self, storefront: Storefront, params: ChoiceParams | None = None) -> None:
        self.storefront = storefront
        self.params = params or ChoiceParams()
        aff = storefront.affinities
        self.activity = latent_activity(aff.shape[0], self.params.activity_sd, storefront.config.seed)
        """Each user's latent activity (mean 1): clicks, visits and pre-period events scale with it."""
        self._affinity = aff / aff.max(axis=1, keepdims=True)
        self._successors: list[dict[int, float]] = []
        for succ, weights in zip(storefront.successors, storefront.successor_weights, strict=True):
            top = max(weights)
            self._successors.append({s: 0.5 + 0.5 * w / top for s, w in zip(succ, weights, strict=True)})

    @property
    def n_users(self) -> int:
        return self.storefront.affinities.shape[0]

    def relevance(self, user: int, page: int | None, item_id: str) -> float:
        """In [0, 1]: how much `user`, on the page of item `page` (None: no item page), wants `item_id`."""
        item = item_index(item_id, self.storefront.n_items)
        if item is None:
            return 0.0
        category = int(self.storefront.category[item])
        affinity = float(self._affinity[user, category]) if category < self._affinity.shape[1] else 0.0
        successor = self._successors[page].get(item, 0.0) if page is not None else 0.0
        w = self.params.successor_weight
        return w * successor + (1 - w) * affinity

    def click_probabilities(self, user: int, page: int | None, items: list[str]) -> np.ndarray:
        p, activity = self.params, float(self.activity[user])
        return np.array([min(1.0, activity * position_bias(pos) * (p.floor + (p.ceiling - p.floor) * self.relevance(user, page, item)))
                         for pos, item in enumerate(items)])

    def expected_clicks(self, user: int, page: int | None, items: list[str]) -> float:
        return float(self.click_probabilities(user, page, items).sum())

    def react(self, user: int, page: int | None, items: list[str], rng: np.random.Generator) -> Reaction:
        """Draw the shopper's clicks, carts and purchases on `items` (same rng state, same reaction)."""
        cfg = self.storefront.config
        probs = self.click_probabilities(user, page, items)
        draws = rng.random((len(items), 3))
        clicked, carted, purchased = [], [], []
        for n, item in enumerate(items):
            if draws[n, 0] >= probs[n]:
                continue
            clicked.append(item)
            if draws[n, 1] < cfg.cart_prob * (0.5 + 0.5 * self.relevance(user, page, item)):
                carted.append(item)
                if draws[n, 2] < cfg.purchase_prob:
                    purchased.append(item)
        return Reaction(clicked, carted, purchased)

    # --- the shopper's own navigation (as the storefront's sessions move) ----------------------
    def own_next(self, user: int, page: int | None, rng: np.random.Generator) -> int:
        """Where the shopper goes by herself: a successor of `page` with `transition_prob`, else a popular
        item of a category drawn from her affinities (the generator's session step)."""
        sf, cfg = self.storefront, self.storefront.config
        if page is not None and rng.random() < cfg.transition_prob:
            succ, weights = sf.successors[page], sf.successor_weights[page]
            return int(succ[min(int(np.searchsorted(np.cumsum(weights), rng.random())), len(succ) - 1)])
        aff = sf.affinities[user]
        category = min(int(np.searchsorted(np.cumsum(aff), rng.random() * aff.sum())), len(aff) - 1)
        pool = sf.catalog.by_category[category]
        if len(pool) == 0:
            return int(rng.integers(sf.n_items))
        weights = sf.popularity[pool]
        return int(pool[min(int(np.searchsorted(np.cumsum(weights), rng.random() * weights.sum())), len(pool) - 1)])

    def pre_period(self, user: int, recent: int | None, first_visit_ms: int, config: PrePeriod,
                   rng: np.random.Generator) -> list[tuple[int, EventType, int]]:
        """The shopper's history before her first visit at `first_visit_ms`: (item, type, ts_ms) in time order,
        Poisson(`config.events` · activity) of them, her navigation going on from `recent` (see the module docstring)."""
        if not config.enabled:
            return []
        cfg = self.storefront.config
        n = int(rng.poisson(config.events * float(self.activity[user])))
        if n == 0:
            return []
        # What she did: views along her own path, some going down the funnel; a new session with 1/steps per view.
        steps: list[tuple[int, EventType, bool]] = []  # (item, type, starts a session)
        page = recent
        while len(steps) < n:
            page = self.own_next(user, page, rng)
            steps.append((page, EventType.VIEW, not steps or rng.random() < 1 / cfg.steps_per_session))
            if len(steps) < n and rng.random() < cfg.click_prob * cfg.cart_prob:
                steps.append((page, EventType.ADD_TO_CART, False))
                if len(steps) < n and rng.random() < cfg.purchase_prob:
                    steps.append((page, EventType.PURCHASE, False))
        # When: session starts uniform in the window, steps `seconds_between_steps` apart on average.
        newest = first_visit_ms - int(config.gap_s * 1000)
        oldest = first_visit_ms - config.span_ms
        sessions = sum(starts for _, _, starts in steps)
        starts = iter(np.sort(rng.uniform(oldest, newest, size=sessions)).tolist())
        gaps = rng.exponential(cfg.seconds_between_steps * 1000, size=n).tolist()
        out: list[tuple[int, EventType, int]] = []
        ts = float(oldest)
        for (item, kind, new_session), gap in zip(steps, gaps, strict=True):
            ts = next(starts) if new_session else ts + gap
            out.append((item, kind, min(int(ts), newest)))
        return sorted(out, key=lambda e: e[2])
