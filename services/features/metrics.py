"""The feature consumer's Prometheus metrics: names, labels and buckets are defined here and only here.

Dashboards and alert rules use these names; tests check that every name they query is exported.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

EVENTS_CONSUMED: Final = "vitrine_features_events_consumed_total"
EVENTS_APPLIED: Final = "vitrine_features_events_applied_total"
EVENTS_DEDUPLICATED: Final = "vitrine_features_events_deduplicated_total"
EVENTS_REJECTED: Final = "vitrine_features_events_rejected_total"
BATCH_SIZE: Final = "vitrine_features_batch_size_events"
BATCH_DURATION: Final = "vitrine_features_batch_duration_seconds"
CONSUMER_LAG: Final = "vitrine_features_consumer_lag_messages"
FRESHNESS: Final = "vitrine_features_freshness_seconds"
ASSIGNED_PARTITIONS: Final = "vitrine_features_assigned_partitions"
WRITE_RETRIES: Final = "vitrine_features_write_retries_total"
OFFSET_REWINDS: Final = "vitrine_features_offset_rewinds_total"
DLQ_SPILLED: Final = "vitrine_features_dlq_spilled_total"

BATCH_SIZE_BUCKETS: Final = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000)
DURATION_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FRESHNESS_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class FeatureMetrics:
    """One set of the consumer's metrics, registered in `registry` (a fresh one in tests)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # prometheus_client appends _total to counters itself: pass the base name.
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name.removesuffix("_total"), doc, labels, registry=registry)

        self.consumed = counter(EVENTS_CONSUMED, "Kafka records read from the events topic.", ("topic",))
        self.applied = counter(EVENTS_APPLIED, "Events applied to the feature store.", ("type",))
        self.deduplicated = counter(EVENTS_DEDUPLICATED, "Events skipped because their event_id was already applied.", ("type",))
        self.rejected = counter(EVENTS_REJECTED, "Records sent to the DLQ instead of being applied.", ("reason",))
        self.write_retries = counter(WRITE_RETRIES, "Batch writes (Redis script or DLQ) retried after a failure.")
        self.offset_rewinds = counter(
            OFFSET_REWINDS, "Partitions sought back because Redis held an older offset than this consumer stored (Redis lost writes).")
        self.dlq_spilled = counter(
            DLQ_SPILLED, "Rejected records the DLQ would not take, written to the local spill file instead.", ("reason",))
        self.batch_size = Histogram(BATCH_SIZE, "Records per processed batch.", buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.batch_duration = Histogram(BATCH_DURATION, "Time to validate, dead-letter and write one batch.", buckets=DURATION_BUCKETS, registry=registry)
        self.freshness = Histogram(FRESHNESS, "Feature visible in Redis minus event time.", buckets=FRESHNESS_BUCKETS, registry=registry)
        self.lag = Gauge(CONSUMER_LAG, "High watermark minus the next offset to process.", ("topic", "partition"), registry=registry)
        self.assigned = Gauge(ASSIGNED_PARTITIONS, "Partitions this consumer owns right now.", registry=registry)
