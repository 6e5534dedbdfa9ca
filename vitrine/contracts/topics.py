"""Kafka topic names: the only place they are spelled out."""

from typing import Final

EVENTS: Final = "events"
"""Storefront events (view, click, add_to_cart, purchase), keyed by user id."""

RECS_SERVED: Final = "recs.served"
"""Exposure log: every answer the gateway served, for comparing variants offline."""

EVENTS_DLQ: Final = "events.dlq"
"""Events the feature consumer rejected, with the reason, so that nothing is silently lost."""

OUTCOMES_DLQ: Final = "outcomes.dlq"
"""Exposures and events the outcome service rejected, with the reason (header `reason`)."""

ARCHIVE_DLQ: Final = "archive.dlq"
"""Events and exposures the archive rejected (not valid under their contract), with the reason (header `reason`)."""

ALL: Final[tuple[str, ...]] = (EVENTS, RECS_SERVED, EVENTS_DLQ, OUTCOMES_DLQ, ARCHIVE_DLQ)
