"""A plain-Python reference of the feature store: what Redis must hold after a set of events.

Written independently of the Lua script, from the layout's definition in docs/redis-layout.md.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from vitrine.contracts.events import Event, EventType
from vitrine.services.features.store import POPULARITY_WEIGHT, RecentEvent, UserFeatures
from vitrine.settings import FeaturesSettings

DAY_MS = 86_400_000


@dataclass
class Reference:
    users: dict[str, UserFeatures]
    popular: dict[str, float]
    trending: dict[str, float]
    successors: dict[str, dict[str, float]]
    """item → successor → count: the item → next-item table."""


def compute(events: list[Event], cfg: FeaturesSettings, now_ms: int) -> Reference:
    unique = {e.event_id: e for e in events}.values()  # a repeated event_id counts once
    by_user: dict[str, list[Event]] = defaultdict(list)
    popular: dict[str, float] = defaultdict(float)
    trending: dict[str, float] = defaultdict(float)
    for event in unique:
        by_user[event.user_id].append(event)
        popular[event.item_id] += POPULARITY_WEIGHT[event.type]
        if event.ts_ms // DAY_MS >= now_ms // DAY_MS - 1:
            age_ms = now_ms - event.ts_ms
            trending[event.item_id] += POPULARITY_WEIGHT[event.type] * math.pow(2, -age_ms / (cfg.trending_half_life_s * 1000))
    users = {}
    for user, user_events in by_user.items():
        member = lambda e: (e.ts_ms, f"{e.item_id}\x1f{e.type.value}\x1f{e.event_id}")  # noqa: E731 - Redis' ZSET order
        ordered = sorted(user_events, key=member)[-cfg.recent_events :]
        counts = {}
        for window in cfg.windows_s:
            bucket = now_ms // (window * 1000)
            in_window = [e for e in user_events if e.ts_ms // (window * 1000) == bucket]
            counts[window] = {t: n for t in EventType if (n := sum(e.type is t for e in in_window))}
        purchases: dict[str, int] = {}
        for e in user_events:
            if e.type is EventType.PURCHASE:
                purchases[e.item_id] = max(purchases.get(e.item_id, 0), e.ts_ms)
        kept = sorted(purchases, key=lambda item: (purchases[item], item))[-cfg.purchased_max :]
        users[user] = UserFeatures(
            user_id=user,
            recent=tuple(RecentEvent(e.item_id, e.type, e.ts_ms, e.event_id) for e in ordered),
            window_counts=counts,
            purchased=frozenset(kept),
        )
    return Reference(users=users, popular=dict(popular), trending=dict(trending), successors=successors(events, cfg))


def successors(events: list[Event], cfg: FeaturesSettings) -> dict[str, dict[str, float]]:
    """The item → next-item table from events in arrival order (one user's events arrive in order: one partition).

    From the layout's rule: an event that, on arrival, is its user's newest (by event time, then member) and
    whose predecessor there is on another item adds one to predecessor → item; a late event adds nothing.
    Each item keeps its `successors_max` most frequent successors (ties: the greater member stays, as in a ZSET).
    """
    seen: set[str] = set()
    history: dict[str, list[tuple[int, str]]] = defaultdict(list)
    table: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in events:
        if e.event_id in seen:
            continue
        seen.add(e.event_id)
        key = (e.ts_ms, f"{e.item_id}\x1f{e.type.value}\x1f{e.event_id}")
        mine = history[e.user_id]
        if mine and max(mine) > key:
            mine.append(key)
            continue
        if mine:
            previous = max(mine)[1].split("\x1f", 1)[0]
            if previous != e.item_id:
                table[previous][e.item_id] += 1
        mine.append(key)
    kept = {}
    for item, nexts in table.items():
        ranked = sorted(nexts.items(), key=lambda pair: (pair[1], pair[0]))[-cfg.successors_max :]
        kept[item] = dict(ranked)
    return kept
