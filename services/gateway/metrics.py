"""The gateway's Prometheus metrics: names, labels and buckets live here and only here.

Latencies are in seconds (base unit) with millisecond-scale buckets; every series that describes an
answer carries the variant and the model version, so that dashboards compare variants directly.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

REQUESTS: Final = "vitrine_gateway_requests_total"
REQUEST_DURATION: Final = "vitrine_gateway_request_duration_seconds"
STAGE_DURATION: Final = "vitrine_gateway_stage_duration_seconds"
TOP1_SCORE: Final = "vitrine_gateway_top1_score"
MEAN_TOPK_SCORE: Final = "vitrine_gateway_mean_topk_score"
DEGRADED: Final = "vitrine_gateway_degraded_total"
ANSWERS: Final = "vitrine_gateway_answers_total"
BATCH_SIZE: Final = "vitrine_gateway_batch_size_requests"
INFLIGHT: Final = "vitrine_gateway_inflight_requests"
EXPOSURES_SENT: Final = "vitrine_gateway_exposures_sent_total"
EXPOSURES_DROPPED: Final = "vitrine_gateway_exposures_dropped_total"
EXPOSURES_BUFFERED: Final = "vitrine_gateway_exposures_buffered_records"
DROPPED_BUFFER_FULL: Final = "buffer_full"
DROPPED_SHUTDOWN: Final = "shutdown"
DROPPED_REASONS: Final = (DROPPED_BUFFER_FULL, DROPPED_SHUTDOWN)
"""Values of the `reason` label of EXPOSURES_DROPPED. A Kafka error drops nothing: the batch is sent again."""
VARIANT_WEIGHT: Final = "vitrine_gateway_variant_weight_percent"
EXPERIMENT_REVISION: Final = "vitrine_gateway_experiment_revision"
MODEL_READY: Final = "vitrine_gateway_model_ready"
DRIFT_PSI: Final = "vitrine_drift_psi"
BREAKER_STATE: Final = "vitrine_gateway_breaker_state"
DEPENDENCY_UP: Final = "vitrine_gateway_dependency_up"
MALFORMED: Final = "vitrine_gateway_malformed_requests_total"

LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
SCORE_BUCKETS: Final = tuple(float(b) for b in range(-4, 25, 2))
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128)
STAGES: Final = ("features", "queue", "triton", "postprocess")
DEPENDENCIES: Final = ("redis", "triton")
SOURCE_MODEL, SOURCE_INTERLEAVED, SOURCE_TRENDING = "model", "interleaved", "trending"
SOURCE_TRANSITIONS, SOURCE_POPULARITY, SOURCE_MEMORY = "transitions", "popularity", "memory"
SOURCES: Final = (SOURCE_MODEL, SOURCE_INTERLEAVED, SOURCE_TRENDING, SOURCE_TRANSITIONS, SOURCE_POPULARITY, SOURCE_MEMORY)
"""The `source` label: what produced an answer's items — a model through Triton, two models interleaved, trending
(cold start), the item → next-item table (topped up with popularity), popularity from Redis, or popularity's
in-memory copy (Redis away). A fixed set, whatever happens."""
UNKNOWN_METHOD: Final = "unknown"
"""The `method` label of calls to paths the gateway does not serve: labels stay a fixed set whatever callers send."""


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(REQUESTS.removesuffix("_total"), "Answered RPCs by method, status code and variant.",
                                ("method", "code", "variant"), registry=registry)
        self.duration = Histogram(REQUEST_DURATION, "End-to-end time of Recommend inside the gateway.",
                                  ("variant", "model_version"), buckets=LATENCY_BUCKETS, registry=registry)
        self.stage = Histogram(STAGE_DURATION, "Time per stage of the request path.", ("stage",),
                               buckets=LATENCY_BUCKETS, registry=registry)
        self.top1 = Histogram(TOP1_SCORE, "Score of the first recommended item (model answers only).",
                              ("variant", "model_version"), buckets=SCORE_BUCKETS, registry=registry)
        self.mean_topk = Histogram(MEAN_TOPK_SCORE, "Mean score of the returned items (model answers only).",
                                   ("variant", "model_version"), buckets=SCORE_BUCKETS, registry=registry)
        self.degraded = Counter(DEGRADED.removesuffix("_total"), "Degraded answers by reason and the fallback that served them.",
                                ("reason", "variant", "source"), registry=registry)
        self.answers = Counter(ANSWERS.removesuffix("_total"),
                               "Answers delivered, by what produced their items (model, transitions, popularity, ...), degraded or not.",
                               ("source", "variant"), registry=registry)
        self.batch_size = Histogram(BATCH_SIZE, "Requests per Triton call.", ("model",), buckets=BATCH_BUCKETS, registry=registry)
        self.inflight = Gauge(INFLIGHT, "Recommend calls being answered right now.", registry=registry)
        self.exposures_sent = Counter(EXPOSURES_SENT.removesuffix("_total"), "Exposure records written to Kafka.", registry=registry)
        self.exposures_dropped = Counter(EXPOSURES_DROPPED.removesuffix("_total"),
                                         "Exposure records never sent: the buffer was full (Kafka away too long), or still held at shutdown.",
                                         ("reason",), registry=registry)
        for reason in DROPPED_REASONS:
            self.exposures_dropped.labels(reason)
        self.exposures_buffered = Gauge(EXPOSURES_BUFFERED, "Exposure records waiting to be sent: the buffer plus the batch held "
                                        "until Kafka acknowledges it (answers = sent + dropped + buffered).", registry=registry)
        self.variant_weight = Gauge(VARIANT_WEIGHT, "Current traffic split.", ("variant", "model_name", "model_version"), registry=registry)
        self.experiment_revision = Gauge(EXPERIMENT_REVISION, "Revision of the experiment this gateway follows.", registry=registry)
        self.model_ready = Gauge(MODEL_READY, "1 when the model version a variant uses is ready in Triton.", ("model_name", "model_version"), registry=registry)
        self.drift_psi = Gauge(DRIFT_PSI, "Population stability index of live inputs/outputs against the model version's reference.",
                               ("feature", "variant"), registry=registry)
        self.breaker_state = Gauge(BREAKER_STATE, "Triton circuit per model: 0 closed, 1 half-open (trial calls), 2 open.",
                                   ("model",), registry=registry)
        self.dependency_up = Gauge(DEPENDENCY_UP, "1 while the dependency answers (the gateway still answers, degraded, when it does not).",
                                   ("dependency",), registry=registry)
        self.malformed = Counter(MALFORMED.removesuffix("_total"), "Requests whose body could not be decoded.", ("method",), registry=registry)
        for stage in STAGES:
            self.stage.labels(stage)


def label_sets(metric: MetricWrapperBase, names: tuple[str, ...]) -> set[tuple[str, ...]]:
    """The label values of every series `metric` exports now (read through the public collect())."""
    return {tuple(sample.labels[n] for n in names) for family in metric.collect() for sample in family.samples
            if all(n in sample.labels for n in names)}
