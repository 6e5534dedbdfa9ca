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
    return Reference(users=users, popular=dict(popular), trending=dict(trending))
