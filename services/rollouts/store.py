"""The rollout's state and audit in Redis: the one module that knows their layout (controller and CLI use it).

Keys (`ns` = features.namespace, the experiment's namespace): `ns:rollout` (JSON of `RolloutState`, the one rollout of
the namespace's experiment) and `ns:rollout:audit` (LIST of JSON `AuditEntry`, newest first). Every change is one
optimistic transaction on `ns:rollout` (WATCH, compare the state's own revision), so the controller and a person
typing `vitrine rollout pause` cannot overwrite each other unnoticed; the audit entry is written in the same
transaction. Nothing lives in the controller's memory: a restarted controller continues where the state says.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from vitrine.settings import check_steps

Status = Literal["running", "paused", "rolled_back", "completed", "aborted"]
RUNNING, PAUSED, ROLLED_BACK, COMPLETED, ABORTED = "running", "paused", "rolled_back", "completed", "aborted"
FINISHED: tuple[str, ...] = (ROLLED_BACK, COMPLETED, ABORTED)
"""Statuses a rollout never leaves (a new `start` replaces it)."""
STATUSES: tuple[str, ...] = (RUNNING, PAUSED, ROLLED_BACK, COMPLETED, ABORTED)
AUDIT_KEEP = 10_000


class RolloutState(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    version: Annotated[str, StringConstraints(pattern=r"^[0-9]{0,10}$")] = ""
    """Empty: the newest version Triton serves."""
    variant: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,32}$")] = "challenger"
    """The experiment variant the challenger is served as (the last variant: users stay sticky as it grows)."""
    control: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,32}$")]
    """The variant it is compared with (the experiment's first variant when the rollout started)."""
    steps: tuple[int, ...]
    step: int = Field(0, ge=0)
    """Index into `steps` of the share in force."""
    hold_s: float = Field(gt=0)
    status: Status = RUNNING
    step_started_ms: int = Field(ge=0)
    experiment_revision: int = Field(ge=0)
    """The experiment revision this rollout set last: another revision means somebody else changed the split."""
    revision: int = Field(1, ge=1)
    """The state's own revision (optimistic concurrency)."""
    started_by: str = ""
    updated_at_ms: int = 0
    reason: str = ""
    """Why the status is what it is (the last decision's reasons, a person's command)."""

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: tuple[int, ...]) -> tuple[int, ...]:
        return check_steps(steps)

    @property
    def percent(self) -> int:
        """The challenger's share now (0 once rolled back or aborted)."""
        return 0 if self.status in (ROLLED_BACK, ABORTED) else self.steps[self.step]

    @property
    def last_step(self) -> bool:
        return self.step == len(self.steps) - 1

    @property
    def target(self) -> str:
        return f"{self.model}:{self.version}" if self.version else self.model


class AuditEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    by: str
    at_ms: int
    action: str
    """start, advance, hold, rollback, complete, pause, resume, abort, conflict."""
    status: tuple[str, str]
    """Old → new status."""
    weights: tuple[dict[str, int], dict[str, int]]
    """Old → new experiment weights by variant (equal when the split did not change)."""
    reasons: list[str] = Field(default_factory=list)
    numbers: dict[str, float | str | bool | None] = Field(default_factory=dict)
    experiment_revision: int = 0


class StateConflict(RuntimeError):
    """The rollout changed since the caller read it; read it again."""


class InvalidState(ValueError):
    """The stored state is not a rollout state today's rules accept (written by hand, or by an incompatible version)."""


class RolloutStore:
    def __init__(self, client: aioredis.Redis, namespace: str) -> None:
        self.client = client
        self.key = f"{namespace}:rollout"
        self.audit_key = f"{namespace}:rollout:audit"

    async def load(self) -> RolloutState | None:
        return self._parse(await self.client.get(self.key))

    def _parse(self, raw: bytes | None) -> RolloutState | None:
        if not raw:
            return None
        try:
            return RolloutState.model_validate_json(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'state'}: {e['msg']}" for e in exc.errors(include_url=False, include_input=False))
            raise InvalidState(f"the rollout state in Redis ({self.key}) is invalid ({problems}); nothing acts on it — "
                               f"inspect it, then delete the key to start over (the experiment's split is unchanged)") from None

    async def save(self, new: RolloutState, entry: AuditEntry, expected_revision: int | None) -> RolloutState:
        """Store `new` (its revision one above the stored one) and its audit entry atomically.

        expected_revision: the state revision the caller read (None: there must be no state, or a finished one)."""
        async with self.client.pipeline(transaction=True) as pipe:
            await pipe.watch(self.key)
            old = self._parse(await pipe.get(self.key))
            if expected_revision is None:
                if old is not None and old.status not in FINISHED:
                    await pipe.unwatch()
                    raise StateConflict(f"a rollout of {old.target} is {old.status} (step {old.percent} %); abort it first")
            elif old is None or old.revision != expected_revision:
                await pipe.unwatch()
                raise StateConflict(f"the rollout is at revision {old.revision if old else 'none'}, not {expected_revision}")
            stored = new.model_copy(update={"revision": (old.revision + 1) if old else 1, "updated_at_ms": now_ms()})
            pipe.multi()
            pipe.set(self.key, stored.model_dump_json())
            pipe.lpush(self.audit_key, entry.model_dump_json())
            pipe.ltrim(self.audit_key, 0, AUDIT_KEEP - 1)
            try:
                await pipe.execute()
            except aioredis.WatchError as exc:
                raise StateConflict("the rollout changed during the update; read it again") from exc
        return stored

    async def audit(self, limit: int = 100) -> list[AuditEntry]:
        """The newest `limit` entries; an entry today's rules reject is shown as such, not dropped."""
        entries = []
        for raw in await self.client.lrange(self.audit_key, 0, limit - 1):
            try:
                entries.append(AuditEntry.model_validate_json(raw))
            except ValidationError as exc:
                entries.append(AuditEntry(by="?", at_ms=0, action="unreadable", status=("", ""), weights=({}, {}),
                                          reasons=[f"an audit entry this version cannot read ({exc.error_count()} problems): {raw[:200]!r}"]))
        return entries


def now_ms() -> int:
    return int(time.time() * 1000)


