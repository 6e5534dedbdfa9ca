"""Answers that need no model: trending for users without history, popularity when degraded.

Popularity is read from Redis when it answers; a copy refreshed every `refresh_s` stays in memory
for when it does not, so that even with Redis and Triton both down a storefront gets items.
"""

from __future__ import annotations

import asyncio
import logging
import time

from vitrine.services.features.store import FeatureStore

log = logging.getLogger(__name__)
Ranked = list[tuple[str, float]]


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

    async def popular(self) -> tuple[Ranked, bool]:
        """Popularity from Redis, or the in-memory copy; the flag says whether Redis answered."""
        try:
            async with asyncio.timeout(self.redis_timeout_s):
                return await self.store.popular(self.depth), True
        except Exception:  # noqa: BLE001
            return self.popular_copy, False
