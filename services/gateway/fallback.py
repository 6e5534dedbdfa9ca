"""Answers that need no model: trending for users without history; when degraded, the successors of
the shopper's last item topped up with popularity, else popularity alone.

The degrade chain is model → transitions → popularity → memory: the item → next-item table
(`ns:next:<item>`, kept by the feature consumer) is read together with popularity in one pipelined
round trip; popularity alone serves when the last item has no successor the shopper may see; a copy
of popularity refreshed every `refresh_s` stays in memory for when Redis does not answer, so that even
with Redis and Triton both down a storefront gets items.

The same transitions answer serves, undegraded, shoppers with at most
`gateway.transitions_max_history` steps (docs/benchmarks.md, "Fallback quality").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Sequence
from typing import Final

from vitrine.export.data.sequences import collapse_runs
from vitrine.services.features.store import FeatureStore, RecentEvent

log = logging.getLogger(__name__)
Ranked = list[tuple[str, float]]
TOP_UP_SCORE: Final = 0.0
"""Score of an item that tops up a transitions answer from popularity: it never followed the last item,
so it scores below every successor (whose score is how often it did); the order among them is popularity's."""


def steps(recent: Sequence[RecentEvent]) -> list[str]:
    """The shopper's steps, oldest first: runs of events on one item collapsed (as training and the
    feature consumer's successor table count them)."""
    return collapse_runs([e.item_id for e in recent], [e.type.index for e in recent])[0]


def successors_then_popular(successors: Ranked, popular: Ranked, k: int, excluded: Collection[str]) -> tuple[Ranked, int]:
    """The transitions answer: successors of the last item, most frequent first, then popularity, skipping
    excluded items and repeats, at most k. Returns the items and how many are successors (0: popularity alone).

    Mirrors the offline `transitions` baseline (export/baselines.py), whose ties — including every item
    that never followed the last one — are broken by popularity.
    """
    out: Ranked = []
    taken: set[str] = set()
    for ranked, from_table in ((successors, True), (popular, False)):
        for item, score in ranked:
            if len(out) == k:
                break
            if item in excluded or item in taken:
                continue
            taken.add(item)
            out.append((item, score if from_table else TOP_UP_SCORE))
    return out, sum(1 for item, _ in successors if item in taken)


class PopularityFallback:
    def __init__(self, store: FeatureStore, depth: int, refresh_s: float, redis_timeout_s: float) -> None:
        self.store = store
        self.depth = depth
        self.refresh_s = refresh_s
        self.redis_timeout_s = redis_timeout_s
        self.popular_copy: Ranked = []
        self.trending_copy: Ranked = []
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def refresh(self) -> None:
        now_ms = int(time.time() * 1000)
        async with asyncio.timeout(max(self.redis_timeout_s, 1.0)):
            self.popular_copy = await self.store.popular(self.depth)
            self.trending_copy = await self.store.trending(self.depth, now_ms) or self.popular_copy

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep the last copy while Redis is away
                log.debug("popularity refresh failed: %s", exc)
            await asyncio.sleep(self.refresh_s)

    def trending(self) -> Ranked:
        """Cold start: what is hot now (the in-memory copy, at most `refresh_s` old)."""
        return self.trending_copy or self.popular_copy

    async def successors_and_popular(self, last_item: str, n: int) -> tuple[Ranked, Ranked]:
        """The last item's n most frequent successors and popularity, in one round trip bounded by the Redis
        budget (raises when Redis does not answer; the caller falls back to the in-memory copy)."""
        async with asyncio.timeout(self.redis_timeout_s):
            return await self.store.successors_and_popular(last_item, n, self.depth)

    async def popular(self) -> tuple[Ranked, bool]:
        """Popularity from Redis, or the in-memory copy; the flag says whether Redis answered."""
        try:
            async with asyncio.timeout(self.redis_timeout_s):
                return await self.store.popular(self.depth), True
        except Exception:  # noqa: BLE001
            return self.popular_copy, False
