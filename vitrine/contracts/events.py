"""The storefront event: one schema for the Kafka pipeline, the generators, the loaders and training.

On the wire an event is one JSON object per Kafka message (UTF-8), keyed by user id so that one user's
events stay ordered in one partition. JSON rather than protobuf because shops publish from every
language and tool (including kcat and curl-to-REST proxies) without a schema registry or codegen, a
rejected event in the DLQ is readable as it was sent, and at our sizes (~150 bytes) parsing with
pydantic's Rust core costs a few microseconds. The model below validates every field; `parse_event`
turns anything else into a `EventRejected` with the reason, for the DLQ.
"""

from __future__ import annotations

import enum
from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

MAX_ID_LENGTH: Final = 128
MIN_TS_MS: Final = 100_000_000_000
"""1973-03-03 in milliseconds: a smaller value is seconds sent as milliseconds (today ~1.8e9), not an event.
Old data sets (MovieLens 100k is from 1997) stay valid."""
MAX_FUTURE_SKEW_MS: Final = 24 * 3600 * 1000
"""How far ahead of the consumer's clock an event time may be before it is called absurd."""

Identifier = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_ID_LENGTH, pattern=r"^[\w.:@/-]+$")
]


class EventType(enum.StrEnum):
    """The storefront funnel, weakest to strongest signal. Order matters: `strength` ranks them."""

    VIEW = "view"
    CLICK = "click"
    ADD_TO_CART = "add_to_cart"
    PURCHASE = "purchase"

    @property
    def strength(self) -> int:
        return _STRENGTH[self]

    @property
    def index(self) -> int:
        """Model input id of this type; 0 is reserved for padding."""
        return _STRENGTH[self] + 1


_STRENGTH: Final = {t: i for i, t in enumerate(EventType)}
NUM_EVENT_TYPES: Final = len(EventType)


class EventContext(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    page: Annotated[str, StringConstraints(max_length=64)] | None = None
    referrer_item_id: Identifier | None = None
    session_id: Identifier | None = None


class Event(BaseModel):
    """One storefront event. `ts_ms` is the event time (epoch milliseconds), set by the shop."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: Identifier
    user_id: Identifier
    item_id: Identifier
    type: EventType
    ts_ms: int = Field(ge=MIN_TS_MS, lt=10**15)
    context: EventContext | None = None

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class EventRejected(ValueError):
    """An input that is not a valid event; `reason` is a short machine-friendly label for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_event(raw: bytes | str, now_ms: int | None = None) -> Event:
    """Validate one wire event. Raises `EventRejected` with reason `not_json`, `missing_field`,
    `unknown_type`, `invalid_field` or `absurd_timestamp`."""
    try:
        event = Event.model_validate_json(raw)
    except ValidationError as exc:
        raise EventRejected(_reason(exc), _summary(exc)) from exc
    if now_ms is not None and event.ts_ms > now_ms + MAX_FUTURE_SKEW_MS:
        raise EventRejected("absurd_timestamp", f"ts_ms {event.ts_ms} is more than a day ahead of {now_ms}")
    return event


def _reason(exc: ValidationError) -> str:
    errors = exc.errors()
    kinds = {e["type"] for e in errors}
    locations = {e["loc"][0] for e in errors if e["loc"]}
    if "json_invalid" in kinds or "json_type" in kinds or "model_type" in kinds:
        return "not_json"
    if "missing" in kinds:
        return "missing_field"
    if "enum" in kinds and "type" in locations:
        return "unknown_type"
    if "ts_ms" in locations:
        return "absurd_timestamp"
    return "invalid_field"


def _summary(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'event'}: {e['msg']}" for e in exc.errors(include_url=False)[:5]
    )
