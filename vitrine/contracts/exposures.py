"""The exposure record: one served answer, as the gateway writes it to Kafka `recs.served` (JSON),
keyed by user id (so that a user's exposures and events share a partition number when both topics
have the same partition count). The outcome service joins it with the user's later events.

Fields added after the first version have defaults, so records written before them still parse.
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vitrine.contracts.events import MAX_FUTURE_SKEW_MS, MIN_TS_MS, EventRejected
from vitrine.contracts.experiments import ExperimentNameOrNone

AB: Final = "ab"
INTERLEAVE: Final = "interleave"
ExperimentMode = Literal["ab", "interleave"]


class Exposure(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str
    user_id: str
    ts_ms: int
    variant: str
    """A/B: the user's variant. Interleaving: the experiment's name for the merged list ("interleave")."""
    model_name: str
    model_version: str
    item_ids: list[str]
    scores: list[float]
    latency_ms: float
    degraded: bool
    degraded_reason: str = ""
    page: str = ""
    experiment: ExperimentNameOrNone = ""
    """Name of the experiment whose assignment served this answer (`contracts.experiments`; "" in records written
    before experiments had names). Any other value is rejected (`invalid_field`)."""
    revision: int = Field(0, ge=0)
    """Its revision: a split change starts a new one, and outcomes are analysed per revision."""
    mode: ExperimentMode = AB
    slot_variants: list[str] = Field(default_factory=list)
    """Interleaving: the variant (team) that filled each slot, parallel to `item_ids`; empty in A/B mode."""
    features_ts_ms: int = 0
    """Event time of the newest event in the user's features when the answer was computed (0: none)."""

    @model_validator(mode="after")
    def _parallel(self) -> Exposure:
        if len(self.scores) != len(self.item_ids):
            raise ValueError("scores and item_ids must have the same length")
        if self.slot_variants and len(self.slot_variants) != len(self.item_ids):
            raise ValueError("slot_variants must name one variant per slot")
        return self


def parse_exposure(raw: bytes | str | None, now_ms: int | None = None) -> Exposure:
    """Validate one `recs.served` record. Raises `EventRejected` with reason `not_json`, `missing_field`,
    `invalid_field` or `absurd_timestamp` (the same reasons as events, so the DLQ speaks one language)."""
    if raw is None:
        raise EventRejected("not_json", "empty record value")
    try:
        exposure = Exposure.model_validate_json(raw)
    except ValidationError as exc:
        kinds = {e["type"] for e in exc.errors()}
        reason = ("not_json" if kinds & {"json_invalid", "json_type", "model_type"}
                  else "missing_field" if "missing" in kinds else "invalid_field")
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'exposure'}: {e['msg']}" for e in exc.errors(include_url=False)[:5])
        raise EventRejected(reason, detail) from exc
    if exposure.ts_ms < MIN_TS_MS or (now_ms is not None and exposure.ts_ms > now_ms + MAX_FUTURE_SKEW_MS):
        raise EventRejected("absurd_timestamp", f"ts_ms {exposure.ts_ms} is not a plausible event time")
    if exposure.mode == INTERLEAVE and not exposure.slot_variants:
        raise EventRejected("invalid_field", "an interleaved exposure must name the team of each slot (slot_variants)")
    if not exposure.user_id or not exposure.request_id:
        raise EventRejected("invalid_field", "user_id and request_id must not be empty")
    return exposure
