"""The A/B experiment: stored in Redis, cached in every gateway, changed at runtime.

Keys (`ns` = features.namespace): `ns:experiment` (JSON of the current experiment), `ns:experiment:audit`
(LIST of JSON records, newest first: who, when, old → new) and the pub/sub channel
`ns:experiment:changed` (payload: the new revision). A change is one optimistic transaction (WATCH on
the experiment key), so two experimenters cannot overwrite each other unnoticed.

Assignment hashes (salt, user_id) into 10,000 buckets; variants own consecutive bucket ranges in
their listed order, so a user stays in a variant, and a change of weights moves only the buckets
between the old and the new boundaries.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Annotated

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from vitrine.contracts.experiments import ExperimentName
from vitrine.contracts.exposures import AB, INTERLEAVE, ExperimentMode
from vitrine.settings import VariantSettings

log = logging.getLogger(__name__)
BUCKETS = 10_000


class Variant(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,32}$")]
    model_name: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    model_version: Annotated[str, StringConstraints(pattern=r"^[0-9]{0,10}$")] = ""
    weight: int = Field(ge=0, le=100)


class Experiment(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: ExperimentName = "default"
    """Letters, digits, `_.-` (vitrine/contracts/experiments.py): it becomes part of Redis keys and fields."""
    salt: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    variants: tuple[Variant, ...] = Field(min_length=1, max_length=16)
    revision: int = Field(0, ge=0)
    updated_by: str = ""
    updated_at_ms: int = 0
    mode: ExperimentMode = AB
    """`interleave`: exactly two variants (team A first), every request ranked by both and merged."""

    @model_validator(mode="after")
    def _weights_and_names(self) -> Experiment:
        if self.mode == INTERLEAVE and len(self.variants) != 2:
            raise ValueError(f"interleaving compares exactly two variants, got {len(self.variants)}")
        total = sum(v.weight for v in self.variants)
        if total != 100:
            raise ValueError(f"variant weights must sum to 100, not {total}")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique: {names}")
        return self

    def assign(self, user_id: str) -> Variant:
        bucket = bucket_of(self.salt, user_id)
        boundary = 0
        for variant in self.variants:
            boundary += variant.weight * BUCKETS // 100
            if bucket < boundary:
                return variant
        return self.variants[-1]


def bucket_of(salt: str, user_id: str) -> int:
    digest = hashlib.sha256(f"{salt}\x1f{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


class ConflictError(RuntimeError):
    """The experiment changed since the caller read it (expected_revision no longer matches)."""


class ExperimentStore:
    def __init__(self, client: aioredis.Redis, namespace: str) -> None:
        self.client = client
        self.key = f"{namespace}:experiment"
        self.audit_key = f"{namespace}:experiment:audit"
        self.channel = f"{namespace}:experiment:changed"

    async def load(self) -> Experiment | None:
        raw = await self.client.get(self.key)
        return Experiment.model_validate_json(raw) if raw else None

    async def seed(self, variants: tuple[VariantSettings, ...], salt: str = "vitrine") -> Experiment:
        """Store the configured default unless an experiment exists; return whichever is current."""
        default = Experiment(salt=salt, variants=tuple(Variant(**v.model_dump()) for v in variants),
                             revision=1, updated_by="default", updated_at_ms=int(time.time() * 1000))
        await self.client.set(self.key, default.model_dump_json(), nx=True)
        try:
            current = await self.load()
        except ValidationError as exc:
            return await self._replace_invalid(default, exc)
        assert current is not None
        return current

    async def _replace_invalid(self, default: Experiment, why: ValidationError) -> Experiment:
        """A stored experiment that today's rules reject (e.g. a name written before names were validated) would
        keep every gateway from starting: replace it by the configured default, one revision later, audited."""
        raw = await self.client.get(self.key)
        try:
            old = json.loads(raw)
            revision = int(old.get("revision", 0)) + 1
        except (TypeError, ValueError, AttributeError):
            old, revision = None, 1
        stored = default.model_copy(update={"revision": revision, "updated_by": "default (the stored experiment was invalid)"})
        log.error("the stored experiment is invalid (%s): replaced by the configured default as revision %d", why, revision)
        audit = {"by": stored.updated_by, "at_ms": stored.updated_at_ms, "old": old, "new": json.loads(stored.model_dump_json())}
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.key, stored.model_dump_json())
            pipe.lpush(self.audit_key, json.dumps(audit))
            pipe.publish(self.channel, str(stored.revision))
            await pipe.execute()
        return stored

    async def save(self, new: Experiment, by: str, expected_revision: int = 0) -> Experiment:
        async with self.client.pipeline(transaction=True) as pipe:
            await pipe.watch(self.key)
            raw = await pipe.get(self.key)
            old = Experiment.model_validate_json(raw) if raw else None
            current_revision = old.revision if old else 0
            if expected_revision and expected_revision != current_revision:
                await pipe.unwatch()
                raise ConflictError(f"the experiment is at revision {current_revision}, not {expected_revision}")
            stored = new.model_copy(update={"revision": current_revision + 1, "updated_by": by,
                                            "updated_at_ms": int(time.time() * 1000)})
            audit = {"by": by, "at_ms": stored.updated_at_ms, "old": json.loads(old.model_dump_json()) if old else None,
                     "new": json.loads(stored.model_dump_json())}
            pipe.multi()
            pipe.set(self.key, stored.model_dump_json())
            pipe.lpush(self.audit_key, json.dumps(audit))
            pipe.ltrim(self.audit_key, 0, 9999)
            pipe.publish(self.channel, str(stored.revision))
            try:
                await pipe.execute()
            except aioredis.WatchError as exc:
                raise ConflictError("the experiment changed during the update; read it again") from exc
        log.info("experiment revision %d by %s: %s", stored.revision, by, [(v.name, v.weight) for v in stored.variants])
        return stored

    async def audit(self, limit: int = 100) -> list[dict]:
        return [json.loads(r) for r in await self.client.lrange(self.audit_key, 0, limit - 1)]


class ExperimentFollower:
    """Keeps the current experiment in memory: pub/sub for changes within milliseconds, plus a slow
    periodic re-read in case a message was missed (e.g. while Redis was unreachable)."""

    def __init__(self, store: ExperimentStore, current: Experiment, poll_s: float,
                 on_change: Callable[[Experiment], None] | None = None) -> None:
        self.store = store
        self.current = current
        self.poll_s = poll_s
        self.on_change = on_change
        self._tasks: list[asyncio.Task] = []
        if on_change:
            on_change(current)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._poll())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def refresh(self) -> None:
        latest = await self.store.load()
        if latest is not None and latest.revision != self.current.revision:
            self.current = latest
            if self.on_change:
                self.on_change(latest)

    async def _listen(self) -> None:
        while True:
            try:
                async with self.store.client.pubsub() as pubsub:
                    await pubsub.subscribe(self.store.channel)
                    await self.refresh()  # anything published before the subscription took effect
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: keep serving the cached split, retry
                log.warning("experiment subscription lost (%s); retrying", exc)
                await asyncio.sleep(min(self.poll_s, 1.0))

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001
                log.debug("experiment re-read failed: %s", exc)
