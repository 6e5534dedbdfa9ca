"""The exposure record: one served answer, as the gateway writes it to Kafka `recs.served` (JSON),
keyed by user id. Offline analysis joins it with later events to compare variants."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Exposure(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str
    user_id: str
    ts_ms: int
    variant: str
    model_name: str
    model_version: str
    item_ids: list[str]
    scores: list[float]
    latency_ms: float
    degraded: bool
    degraded_reason: str = ""
    page: str = ""
