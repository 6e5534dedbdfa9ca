"""Captured drift baselines in Redis — the one module that knows their layout (writer and reader).

`<ns>:drift:baseline:<model>:<version>:<fingerprint>:<size>` → the reference as JSON (export/drift.py
`build_reference`'s format; the fingerprint is the sha256 of the version's metadata.json, so a later export that reuses
a name and number never inherits another model's baseline; size = `gateway.drift_baseline_observations`, so gateways
configured for another baseline size never share one). The first gateway that completes a version's capture writes it (SET NX);
every other gateway, and a restarted one, adopts the stored baseline instead of capturing its own. That keeps one
baseline per version however many gateways serve it — and a gateway restarted after the traffic shifted does not
take the shifted traffic as its new normal (which would silence the alert). Keys expire `ttl_s` after the last
gateway serving the version refreshed them.
"""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis


class BaselineStore:
    def __init__(self, client: aioredis.Redis, namespace: str, size: int, ttl_s: int, timeout_s: float) -> None:
        self.client = client
        self.prefix = f"{namespace}:drift:baseline"
        self.size = size
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s

    def key(self, model: str, version: str, fingerprint: str) -> str:
        return f"{self.prefix}:{model}:{version}:{fingerprint}:{self.size}"

    def pattern(self, model: str = "*") -> str:
        """Every key of `model` (all: "*") for this baseline size, for SCAN (tools and tests)."""
        return f"{self.prefix}:{model}:*:*:{self.size}"

    async def load(self, model: str, version: str, fingerprint: str) -> dict | None:
        async with asyncio.timeout(self.timeout_s):
            raw = await self.client.get(self.key(model, version, fingerprint))
        return json.loads(raw) if raw else None

    async def save(self, model: str, version: str, fingerprint: str, reference: dict) -> dict:
        """Store `reference` unless another gateway stored one first; returns the stored one (ours or theirs)."""
        key = self.key(model, version, fingerprint)
        async with asyncio.timeout(self.timeout_s):
            if await self.client.set(key, json.dumps(reference), nx=True, ex=self.ttl_s):
                return reference
            raw = await self.client.get(key)
        return json.loads(raw) if raw else reference

    async def touch(self, model: str, version: str, fingerprint: str) -> None:
        async with asyncio.timeout(self.timeout_s):
            await self.client.expire(self.key(model, version, fingerprint), self.ttl_s)
