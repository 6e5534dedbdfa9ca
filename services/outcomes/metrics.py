"""The outcome service's Prometheus metrics: names, labels and buckets are defined here and only here.

Labels are bounded: experiment and variant names (a handful per deployment), event type, reason,
topic and partition. The counters are live views for dashboards; the per-user rows in Redis are the
analysis's truth (a credit that moves to a later-arriving exposure of another variant is counted in
`RECREDITS`, not subtracted from the first variant's counter).
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

EXPOSURES_CONSUMED: Final = "vitrine_outcomes_exposures_consumed_total"
EVENTS_CONSUMED: Final = "vitrine_outcomes_events_consumed_total"
IMPRESSIONS: Final = "vitrine_outcomes_impressions_total"
EXPOSURES_JOINED: Final = "vitrine_outcomes_exposures_total"
ATTRIBUTED: Final = "vitrine_outcomes_attributed_events_total"
RECREDITS: Final = "vitrine_outcomes_recredits_total"
DUPLICATES: Final = "vitrine_outcomes_duplicates_total"
VARIANT_CONFLICTS: Final = "vitrine_outcomes_variant_conflicts_total"
REJECTED: Final = "vitrine_outcomes_records_rejected_total"
BATCH_DURATION: Final = "vitrine_outcomes_batch_duration_seconds"
BATCH_SIZE: Final = "vitrine_outcomes_batch_size_records"
CONSUMER_LAG: Final = "vitrine_outcomes_consumer_lag_messages"
ASSIGNED_PARTITIONS: Final = "vitrine_outcomes_assigned_partitions"
WRITE_RETRIES: Final = "vitrine_outcomes_write_retries_total"
OFFSET_REWINDS: Final = "vitrine_outcomes_offset_rewinds_total"
DLQ_SPILLED: Final = "vitrine_outcomes_dlq_spilled_total"
CORRUPT_STATE: Final = "vitrine_outcomes_corrupt_state_fields_total"

# The experiment monitor (monitor.py): the current revision's analysis, every `monitor_interval_s`.
EXPERIMENT_USERS: Final = "vitrine_experiment_users"
SRM_P_VALUE: Final = "vitrine_experiment_srm_p_value"
RELATIVE_LIFT: Final = "vitrine_experiment_relative_lift_ratio"
SEQUENTIAL_P_VALUE: Final = "vitrine_experiment_sequential_p_value"
INTERLEAVING_PREFERENCE: Final = "vitrine_experiment_interleaving_preference_ratio"
EVALUATIONS: Final = "vitrine_experiment_evaluations_total"
LIFT_BOUNDS: Final = ("estimate", "low", "high")
"""Values of the `bound` label of RELATIVE_LIFT: the estimate and its 95 % interval."""

BATCH_SIZE_BUCKETS: Final = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000)
DURATION_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class OutcomeMetrics:
    """One set of the service's metrics, registered in `registry` (a fresh one in tests)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name.removesuffix("_total"), doc, labels, registry=registry)

        self.exposures_consumed = counter(EXPOSURES_CONSUMED, "Kafka records read from the exposures topic.")
        self.events_consumed = counter(EVENTS_CONSUMED, "Kafka records read from the events topic.")
        self.exposures = counter(EXPOSURES_JOINED, "Exposures joined (first time seen, variant kept).", ("experiment", "variant"))
        self.impressions = counter(IMPRESSIONS, "Items shown (slots) in joined exposures.", ("experiment", "variant"))
        self.attributed = counter(
            ATTRIBUTED, "Events credited to an exposure for the first time, by the exposure's variant.", ("experiment", "variant", "type"))
        self.recredits = counter(RECREDITS, "Credits moved to a more recent exposure that arrived after the event.")
        self.duplicates = counter(DUPLICATES, "Records already joined (same request_id or event_id): no effect.", ("kind",))
        self.variant_conflicts = counter(
            VARIANT_CONFLICTS, "Exposures of a user in another variant than the user's first in the same revision (ignored).", ("experiment",))
        self.rejected = counter(REJECTED, "Records sent to the DLQ instead of being joined.", ("reason",))
        self.write_retries = counter(WRITE_RETRIES, "Batch writes (Redis script or DLQ) retried after a failure.")
        self.offset_rewinds = counter(
            OFFSET_REWINDS, "Partitions sought back because Redis's stored offset differed from this consumer's (rollback or another writer).")
        self.dlq_spilled = counter(DLQ_SPILLED, "Rejected records the DLQ would not take, written to the local spill file instead.", ("reason",))
        self.corrupt_state = counter(CORRUPT_STATE, "Stored join-state fields that did not decode and were skipped (part: exposure, "
                                     "pending, meta); each is logged with the user.", ("part",))
        self.batch_size = Histogram(BATCH_SIZE, "Records per processed batch.", buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.batch_duration = Histogram(BATCH_DURATION, "Time to parse, join and write one batch.", buckets=DURATION_BUCKETS, registry=registry)
        self.lag = Gauge(CONSUMER_LAG, "High watermark minus the next offset to process.", ("topic", "partition"), registry=registry)
        self.experiment_users = Gauge(EXPERIMENT_USERS, "Users with outcomes in the experiment's current phase (its revisions since the arms last changed).",
                                      ("experiment", "variant"), registry=registry)
        self.srm_p_value = Gauge(SRM_P_VALUE, "Always-valid sample-ratio-mismatch p-value (Dirichlet-multinomial, each revision's users against "
                                 "its weights; running minimum: below 0.001 the split is broken and the flag stays).", ("experiment",), registry=registry)
        self.relative_lift = Gauge(RELATIVE_LIFT, "Relative lift of a variant over control (delta method), with its 95 % interval.",
                                   ("experiment", "variant", "metric", "bound"), registry=registry)
        self.sequential_p_value = Gauge(SEQUENTIAL_P_VALUE, "Always-valid (mSPRT) p-value of a variant against control, "
                                        "the running minimum over every look of the experiment's phase (one α across revisions): safe to read at any time.",
                                        ("experiment", "variant", "metric"), registry=registry)
        self.interleaving_preference = Gauge(INTERLEAVING_PREFERENCE, "Interleaving: share of users with a preference who prefer this team.",
                                             ("experiment", "team"), registry=registry)
        self.evaluations = counter(EVALUATIONS, "Analyses of the current revision by the experiment monitor, by outcome.", ("result",))
        self.assigned = Gauge(ASSIGNED_PARTITIONS, "Partitions (of both topics) this consumer owns right now.", registry=registry)
