"""The exposure record: one served answer, as the gateway writes it to Kafka `recs.served` (JSON),
keyed by user id (so that a user's exposures and events share a partition number when both topics
have the same partition count). The outcome service joins it with the user's later events.

Fields added after the first version have defaults, so records written before them still parse.
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    experiment: str = ""
    """Name of the experiment whose assignment served this answer."""
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
