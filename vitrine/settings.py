"""Vitrine's one settings object.

Every tunable lives here, typed and validated. Sources, strongest first: values passed in code
(CLI flags), environment variables prefixed ``VITRINE_`` (nested with ``__``, e.g.
``VITRINE_REDIS__PORT=6380``), a TOML file named by ``VITRINE_CONFIG`` (e.g. ``vitrine.toml``),
then the defaults below. Default ports sit away from the standard ones (6379, 9092, 8000-8002,
9090, 9121) so that a local stack never collides with a user's own servers.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from vitrine.contracts import topics
from vitrine.contracts.outcomes import AnalysedMetric

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILE_ENV = "VITRINE_CONFIG"

Port = Annotated[int, Field(ge=1, le=65535)]
Host = Annotated[str, Field(min_length=1, max_length=253)]


class _Section(BaseModel):
    """Settings sections reject unknown keys so that a typo in a config file is an error, not a no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RedisSettings(_Section):
    host: Host = "127.0.0.1"
    port: Port = 16379
    appendfsync: Literal["always", "everysec", "no"] = "everysec"
    maxmemory_mb: int = Field(1024, ge=16, description="Upper bound on Redis memory; keys carry TTLs too.")

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


class RedisExporterSettings(_Section):
    host: Host = "127.0.0.1"
    port: Port = 19121


class KafkaSettings(_Section):
    host: Host = "127.0.0.1"
    port: Port = 19092
    controller_port: Port = 19093
    partitions: int = Field(4, ge=1, le=1024, description="Partitions per Vitrine topic, created by `stack up`.")
    heap: str = Field("512m", pattern=r"^\d+[kmg]$", description="JVM heap (-Xmx) of the single-node broker.")

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"


class TritonSettings(_Section):
    host: Host = "127.0.0.1"
    http_port: Port = 18000
    grpc_port: Port = 18001
    metrics_port: Port = 18002
    model_repository: Path = REPO_ROOT / "model_repository"
    model_config_name: str = Field(
        "cpu",
        pattern=r"^[A-Za-z0-9_.-]*$",
        description="Selects configs/<name>.pbtxt in every model folder; empty uses config.pbtxt (production GPU).",
    )
    model_control_mode: Literal["explicit", "poll", "none"] = Field(
        "explicit",
        description=(
            "explicit: models are loaded at start-up and later only through the repository API, so that a "
            "half-written export is never picked up and a version swap is a deliberate, checked step."
        ),
    )

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"


class PrometheusSettings(_Section):
    host: Host = "127.0.0.1"
    port: Port = 19090
    scrape_interval_s: float = Field(2.0, gt=0, le=300)
    retention: str = Field("2d", pattern=r"^\d+[smhdwy]$")
    alert_for: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")], Annotated[str, Field(pattern=r"^\d+[smh]$")]] = Field(
        default_factory=dict,
        description="Alert name → its `for:` in the rules the stack renders from deploy/prometheus/alerts.yml (e.g. a test stack "
                    "that must see VitrineInputDrift fire within seconds). Empty: the file's own durations. An unknown alert name "
                    "stops `vitrine stack up`.")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class FeaturesSettings(_Section):
    """The streaming feature consumer (`vitrine features run`) and the feature store layout it writes."""

    group_id: str = Field("vitrine-features", pattern=r"^[A-Za-z0-9_.-]{1,128}$")
    events_topic: str = Field(topics.EVENTS, pattern=r"^[A-Za-z0-9_.-]{1,249}$", description="Input topic; the contract's `events` unless testing or multi-tenant.")
    namespace: str = Field("vt", pattern=r"^[a-z0-9_-]{1,32}$", description="Prefix of every Redis key this store writes.")
    max_batch: int = Field(
        500, ge=1, le=100_000,
        description="Most records written to Redis in one atomic script call. Redis serves nothing else while a script "
                    "runs (~20 µs per event): 500 keeps a backlog's scripts near 10 ms, under the gateway's 50 ms read "
                    "budget; 2,000 reached 33 ms at the same throughput (docs/benchmarks.md).")
    poll_timeout_ms: int = Field(100, ge=1, le=10_000)
    commit_interval_s: float = Field(1.0, ge=0, le=60, description="Kafka commits are a hint (Redis holds the offsets): at most this often.")
    recent_events: int = Field(50, ge=1, le=1000, description="Events kept per user (newest by event time).")
    windows_s: tuple[int, ...] = Field((300, 3600, 86400), min_length=1, max_length=8, description="Tumbling event-time windows.")
    purchased_max: int = Field(200, ge=1, le=10_000)
    dedupe_window_s: int = Field(86400, ge=60, le=30 * 86400, description="How long (event time) an event id is remembered.")
    user_ttl_s: int = Field(30 * 86400, ge=60, description="Idle users' keys expire after this long.")
    trending_half_life_s: int = Field(3600, ge=60, le=7 * 86400)
    popular_max_items: int = Field(10_000, ge=10, le=1_000_000, description="Items kept in the global popularity ranking.")
    successors_max: int = Field(
        100, ge=1, le=10_000,
        description="Successors kept per item in the item → next-item table (`ns:next:<item>`), the most frequent: the "
                    "table's memory is at most this many entries per item. A successor must out-count the last kept one "
                    "to stay, so keep it well above what the gateway reads (k plus exclusions, ≤ gateway.max_k + "
                    "gateway.max_exclusions) for the served head to be stable.")
    successors_ttl_s: int = Field(
        30 * 86400, ge=60,
        description="An item's successor table expires this long after the last step away from the item was counted "
                    "(items nobody visits any more stop taking memory).")
    metrics_host: Host = "127.0.0.1"
    metrics_port: Port = 19400
    redis_retry_max_s: float = Field(5.0, gt=0, le=300, description="Back-off ceiling while Redis is unreachable.")
    offset_check_interval_s: float = Field(
        1.0, gt=0, le=3600,
        description="While idle, how often the stored offsets are compared with the consumer's position "
                    "(a Redis rollback is replayed even when no new events arrive).")
    dlq_topic: str = Field(topics.EVENTS_DLQ, pattern=r"^[A-Za-z0-9_.-]{1,249}$", description="Where rejected records go.")
    dlq_send_attempts: int = Field(
        5, ge=1, le=100,
        description="Tries per rejected record before it is spilled to `dlq_spill_dir` and skipped (an error the "
                    "broker calls permanent, e.g. a record too large for the DLQ, is final once the record was sent alone).")
    dlq_send_timeout_ms: int = Field(10_000, ge=100, le=300_000, description="Bound on one DLQ send (metadata wait included).")
    dlq_spill_dir: Path = Field(
        Path(os.environ.get("VITRINE_CACHE", Path.home() / ".cache" / "vitrine")) / "dlq-spill",
        description="Rejected records the DLQ would not take: `<group_id>.jsonl`, one fsync'd JSON line each.")

    @field_validator("windows_s")
    @classmethod
    def _windows_ascend(cls, windows: tuple[int, ...]) -> tuple[int, ...]:
        if list(windows) != sorted(set(windows)) or windows[0] < 1:
            raise ValueError("windows_s must be positive, distinct and ascending")
        return windows


class OutcomesSettings(_Section):
    """The outcome attribution service (`vitrine outcomes run`): exposures joined with later events, per user."""

    group_id: str = Field("vitrine-outcomes", pattern=r"^[A-Za-z0-9_.-]{1,128}$")
    exposures_topic: str = Field(topics.RECS_SERVED, pattern=r"^[A-Za-z0-9_.-]{1,249}$", description="Exposure log; same partition count as `events_topic`.")
    events_topic: str = Field(topics.EVENTS, pattern=r"^[A-Za-z0-9_.-]{1,249}$", description="Storefront events; keyed by user like the exposures.")
    namespace: str = Field("vt", pattern=r"^[a-z0-9_-]{1,32}$", description="Prefix of every Redis key (the service writes under `<namespace>:o:`).")
    click_window_s: int = Field(1800, ge=1, le=30 * 86400, description="A click credits an exposure at most this long (event time) after it.")
    add_to_cart_window_s: int = Field(7200, ge=1, le=30 * 86400, description="Attribution window of an add-to-cart.")
    purchase_window_s: int = Field(86400, ge=1, le=30 * 86400, description="Attribution window of a purchase.")
    max_lateness_s: int = Field(
        3600, ge=0, le=30 * 86400,
        description="How far (event time) behind the user's newest record an exposure may arrive and still take credit for "
                    "events read before it: events stay buffered per user this long.")
    dedupe_window_s: int = Field(7 * 86400, ge=60, le=60 * 86400, description="How long (event time) request and event ids are remembered; also the look-back of `pre_events`.")
    max_clock_skew_s: int = Field(
        300, ge=0, le=86400,
        description="How far ahead of this service's clock a record's event time may move a user's watermark (the event contract "
                    "accepts a day ahead): a shop's fast clock must not make that user's buffered events look late and be pruned.")
    user_ttl_s: int = Field(30 * 86400, ge=60, description="Idle users' join state expires after this long.")
    revision_ttl_s: int = Field(180 * 86400, ge=60, description="Per-revision outcome rows expire this long after their last update.")
    max_batch: int = Field(2000, ge=1, le=100_000, description="Most records joined and written in one atomic script call.")
    poll_timeout_ms: int = Field(100, ge=1, le=10_000)
    commit_interval_s: float = Field(1.0, ge=0, le=60, description="Kafka commits are a hint (Redis holds the offsets): at most this often.")
    metrics_host: Host = "127.0.0.1"
    metrics_port: Port = 19600
    redis_retry_max_s: float = Field(5.0, gt=0, le=300, description="Back-off ceiling while Redis is unreachable.")
    offset_check_interval_s: float = Field(1.0, gt=0, le=3600, description="While idle, how often the stored offsets are compared with the consumer's.")
    monitor_interval_s: float = Field(10.0, gt=0, le=3600, description="How often the current experiment revision is analysed and its gauges exported.")
    monitor_history: int = Field(2000, ge=1, le=100_000, description="Looks kept per revision for the report's intervals over time.")
    planned_users_per_variant: int = Field(
        10_000, ge=10, le=100_000_000,
        description="Users per variant the always-valid test is tuned for (its τ, fixed at an experiment's first look): it decides "
                    "fastest near this size and stays valid at any size (docs/experiments.md, 'the effect of τ').")
    planned_votes: int = Field(2000, ge=10, le=100_000_000, description="Interleaving: voting users the always-valid preference test is tuned for.")
    guardrail_margins: dict[AnalysedMetric, float] = Field(
        default_factory=lambda: {"conversion": 0.05},
        description="Guardrail metric → relative non-inferiority margin: a variant passes when the always-valid interval shows it "
                    "at most this much worse than control (0.05 = 5 %).")

    @field_validator("guardrail_margins")
    @classmethod
    def _margins_in_range(cls, margins: dict[str, float]) -> dict[str, float]:
        bad = {m: v for m, v in margins.items() if not 0 < v < 1}
        if bad:
            raise ValueError(f"guardrail margins are relative and must lie in (0, 1): {bad}")
        return margins
    dlq_topic: str = Field(topics.OUTCOMES_DLQ, pattern=r"^[A-Za-z0-9_.-]{1,249}$", description="Where rejected records go.")
    dlq_send_attempts: int = Field(5, ge=1, le=100, description="Tries per rejected record before it is spilled to `dlq_spill_dir` and skipped.")
    dlq_send_timeout_ms: int = Field(10_000, ge=100, le=300_000, description="Bound on one DLQ send (metadata wait included).")
    dlq_spill_dir: Path = Field(
        Path(os.environ.get("VITRINE_CACHE", Path.home() / ".cache" / "vitrine")) / "dlq-spill",
        description="Rejected records the DLQ would not take: `<group_id>.jsonl`, one fsync'd JSON line each.")


class ArchiveSettings(_Section):
    """The event archive (`vitrine archive run`): `events` and `recs.served` as Parquet files by date and hour,
    each file committed together with the Kafka offsets it covers (docs/archive.md)."""

    group_id: str = Field("vitrine-archive", pattern=r"^[A-Za-z0-9_.-]{1,128}$")
    events_topic: str = Field(topics.EVENTS, pattern=r"^[A-Za-z0-9_.-]{1,249}$", description="Archived as the `events` table.")
    exposures_topic: str = Field(topics.RECS_SERVED, pattern=r"^[A-Za-z0-9_.-]{1,249}$", description="Archived as the `exposures` table.")
    root: Path | None = Field(
        None, description="Folder of the archive (Hive-style topic=/date=/hour= partitions); unset: `<stack.home>/archive`. "
                          "Use `Settings.archive_root`, which resolves the default.")
    flush_rows: int = Field(
        50_000, ge=1, le=10_000_000,
        description="A Kafka partition's buffer is written as files once it holds this many rows: bounds memory "
                    "(partitions × flush_rows rows) and sets the typical file size.")
    flush_interval_s: float = Field(
        60.0, gt=0, le=86_400,
        description="…or once its oldest record has waited this long: how far the archive may trail the topic. "
                    "Shorter means fresher data and more small files for compaction to merge.")
    flush_check_interval_s: float = Field(1.0, gt=0, le=3600, description="How often buffers are checked for age while no records arrive.")
    compaction_min_files: int = Field(
        4, ge=2, le=100_000,
        description="A closed hour in which one Kafka partition has at least this many files gets them merged into one.")
    compaction_grace_s: float = Field(
        600.0, ge=0, le=30 * 86_400,
        description="An hour counts as closed (eligible for compaction) this long after it ended; later, late events "
                    "still land there in new files, merged by a later pass.")
    compaction_interval_s: float = Field(60.0, gt=0, le=86_400, description="How often closed hours are looked at for compaction.")
    compaction_retention_s: float = Field(
        300.0, ge=0, le=7 * 86_400,
        description="The files a compaction merged stay this long before they are deleted, so that a reader which listed "
                    "them before the merge (a long query, a training read) finishes; Vitrine's readers skip them from the "
                    "merge on (the shadow rule), an engine reading every file counts their rows twice until then.")
    compression: Literal["zstd", "snappy", "gzip", "none"] = Field("zstd", description="Parquet column compression.")
    max_batch: int = Field(2000, ge=1, le=100_000, description="Most records read from Kafka in one poll.")
    poll_timeout_ms: int = Field(100, ge=1, le=10_000)
    commit_interval_s: float = Field(
        1.0, ge=0, le=60, description="Kafka commits are a hint (the archive's own offset files hold the truth): at most this often.")
    metrics_host: Host = "127.0.0.1"
    metrics_port: Port = 19700
    write_retry_max_s: float = Field(5.0, gt=0, le=300, description="Back-off ceiling while a disk write or a DLQ send keeps failing.")
    offset_check_interval_s: float = Field(
        1.0, gt=0, le=3600,
        description="While idle, how often the stored offsets are compared with this member's (another writer is noticed).")
    dlq_topic: str = Field(topics.ARCHIVE_DLQ, pattern=r"^[A-Za-z0-9_.-]{1,249}$", description="Where records that fail their contract go.")
    dlq_send_attempts: int = Field(5, ge=1, le=100, description="Tries per rejected record before it is spilled to `dlq_spill_dir` and skipped.")
    dlq_send_timeout_ms: int = Field(10_000, ge=100, le=300_000, description="Bound on one DLQ send (metadata wait included).")
    dlq_spill_dir: Path = Field(
        Path(os.environ.get("VITRINE_CACHE", Path.home() / ".cache" / "vitrine")) / "dlq-spill",
        description="Rejected records the DLQ would not take: `<group_id>.jsonl`, one fsync'd JSON line each.")

    @property
    def redis_retry_max_s(self) -> float:
        """The name `StoredOffsetsMember` reads for its retry ceiling (here it bounds disk writes, not Redis)."""
        return self.write_retry_max_s

    @model_validator(mode="after")
    def _two_topics(self) -> ArchiveSettings:
        if self.events_topic == self.exposures_topic:
            raise ValueError("events_topic and exposures_topic must differ: each is archived as its own table")
        return self


Role = Literal["storefront", "experimenter", "admin"]


class ApiKey(_Section):
    name: str = Field(min_length=1, max_length=64, description="Who holds the key; recorded in the audit log.")
    role: Role


def _demo_keys() -> dict[str, ApiKey]:
    """Local-stack keys, documented in the README (`vitrine-demo-<role>`). Production configures its own:
    only sha256 hashes of keys are ever stored in configuration."""
    return {
        hashlib.sha256(f"vitrine-demo-{role}".encode()).hexdigest(): ApiKey(name=f"demo-{role}", role=role)
        for role in ("storefront", "experimenter", "admin")
    }


def redact(secret: str) -> str:
    """What may appear in a log about a secret: its length and the first hex digits of its sha256."""
    return f"<redacted, sha256 {hashlib.sha256(secret.encode()).hexdigest()[:8]}…>"


class VariantSettings(_Section):
    name: str = Field(pattern=r"^[a-z0-9_-]{1,32}$")
    model_name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    model_version: str = Field("", pattern=r"^[0-9]{0,10}$")
    weight: int = Field(ge=0, le=100)


DriftReference = Literal["capture", "metadata"]
"""gateway.drift_reference: the baseline captured from a version's first requests in serving, or metadata.json's."""


class GatewaySettings(_Section):
    """The gRPC gateway (`vitrine gateway run`)."""

    host: Host = "127.0.0.1"
    port: Port = 50151
    metrics_host: Host = "127.0.0.1"
    metrics_port: Port = 19500
    max_k: int = Field(50, ge=1, le=1000, description="Largest k a request may ask for (≤ the models' max_k).")
    max_exclusions: int = Field(100, ge=0, le=10_000)
    exclude_width: int = Field(64, ge=1, le=4096, description="Exclusion slots sent to the model; more are filtered afterwards.")
    max_batch: int = Field(64, ge=1, le=128, description="Largest micro-batch (≤ the models' max_batch_size); 1 disables batching.")
    max_delay_ms: float = Field(1.0, ge=0, le=100, description="How long the oldest queued request may wait for a fuller batch.")
    max_inflight_batches: int = Field(2, ge=1, le=64)
    queue_size: int = Field(1024, ge=1, le=1_000_000)
    shed_mode: Literal["fallback", "reject"] = Field("fallback", description="Queue full: degraded popularity answer, or RESOURCE_EXHAUSTED.")
    triton_timeout_ms: float = Field(250, gt=0, le=60_000, description="Cap on one Triton call (the client's deadline may be shorter).")
    redis_timeout_ms: float = Field(50, gt=0, le=60_000)
    breaker_threshold: int = Field(5, ge=1, le=1000, description="Consecutive Triton failures that open the circuit.")
    breaker_reset_s: float = Field(2.0, gt=0, le=600, description="Open circuit: time before trial calls are let through.")
    breaker_probes: int = Field(1, ge=1, le=1000, description="Half-open circuit: trial calls at a time; everybody else degrades until one decides.")
    breaker_min_timeout_ms: float = Field(
        50, gt=0, le=60_000,
        description="A Triton call that timed out counts against the circuit only if it was given at least this long: "
                    "a client's own 2 ms deadline says nothing about Triton's health.")
    request_budget_ms: float = Field(
        1000, gt=0, le=60_000,
        description="Bound on the model path of a request that carries no deadline (readiness, vocabulary, queue, Triton); "
                    "past it the answer is degraded, never late without bound.")
    admin_timeout_ms: float = Field(1000, gt=0, le=60_000, description="Bound on Redis calls of experiment changes and of start-up.")
    refresh_s: float = Field(1.0, gt=0, le=60, description="Popularity/trending copies and model readiness refresh period.")
    transitions_max_history: int = Field(
        2, ge=0, le=1000,
        description="Shoppers with at most this many steps (runs of events on one item collapsed) get the transitions "
                    "answer — successors of their last item from the feature store, topped up with popularity — instead "
                    "of their variant's model; 0 disables. Not in interleave mode or for a `popularity` variant, whose "
                    "rankers are what the experiment compares. Default 2: offline, the transition table is as good as the "
                    "shipped models overall and far ahead of popularity on short histories (docs/benchmarks.md, "
                    "'Fallback quality'), and costs one Redis read instead of a Triton call.")
    exposure_buffer: int = Field(10_000, ge=1, le=10_000_000)
    exposure_linger_ms: float = Field(
        50, ge=0, le=10_000,
        description="How long the exposure producer gathers records into one Kafka request (not on the answer's path).")
    exposure_send_timeout_ms: int = Field(
        10_000, ge=100, le=300_000,
        description="How long the exposure producer waits for Kafka to acknowledge a batch before it sends the batch again "
                    "(records are held, never dropped, on a Kafka error; the buffer bounds how many).")
    experiment_poll_s: float = Field(5.0, gt=0, le=3600, description="Safety re-read of the experiment besides pub/sub.")
    drift_window: int = Field(5000, ge=10, le=1_000_000, description="Recent requests per variant compared with the reference.")
    drift_interval_s: float = Field(5.0, gt=0, le=3600)
    drift_min_observations: int = Field(
        1000, ge=1, le=1_000_000,
        description="Fewest model-ranked requests of the serving version (after its baseline) a variant's PSI is computed "
                    "over. PSI of two samples of one distribution is about (bins − 1) · (1/n + 1/m), not 0: with the "
                    "21 history-length bins, 100 requests alone read ~0.2 on steady traffic, 1,000 ~0.03 (docs/drift.md).")
    drift_reference: DriftReference = Field(
        "capture",
        description="What PSI compares live traffic with. capture: the serving version's own first "
                    "`drift_baseline_observations` model-ranked requests (only shoppers a model ranks, with histories as "
                    "the feature store keeps them — what the model sees in serving; no PSI until captured). metadata: the "
                    "export's distributions on validation data (metadata.json), which differ from serving by construction "
                    "(short histories never reach the model; PSI 1–4 on steady traffic). docs/drift.md.")
    drift_baseline_observations: int = Field(
        2000, ge=10, le=1_000_000,
        description="Capture mode: requests per model version that form its baseline; its PSI noise on steady traffic is "
                    "about (bins − 1) / this, so at least 1,000.")
    drift_baseline_ttl_s: int = Field(
        30 * 86400, ge=60,
        description="Capture mode: a version's baseline is kept in Redis (shared by every gateway, kept across restarts) "
                    "this long after the last gateway serving the version refreshed it.")
    default_variants: tuple[VariantSettings, ...] = (
        VariantSettings(name="control", model_name="gru4rec", weight=50),
        VariantSettings(name="treatment", model_name="sasrec", weight=50),
    )
    api_keys: dict[str, ApiKey] = Field(default_factory=dict, description="sha256(key) → holder and role.")
    demo_keys: bool = Field(
        False,
        description="Also accept the published demo keys (`vitrine-demo-<role>`). Only the local stack turns this on "
                    "(stack.demo_keys); a gateway with neither keys nor this refuses to start.")
    reflection: bool = Field(False, description="Serve gRPC server reflection (the local stack turns it on for grpcurl).")
    error_log_interval_s: float = Field(10.0, ge=0, le=3600, description="The same error is logged at most once per this long.")
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @field_validator("api_keys", mode="before")
    @classmethod
    def _hashes_only(cls, keys: object) -> object:
        # Before validation, so that a raw key pasted here is never echoed: pydantic's error would show
        # the input value (and with it the secret) in logs; `redact` keeps only a short fingerprint.
        if isinstance(keys, dict):
            for digest in keys:
                if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                    raise ValueError(f"api_keys are keyed by the lower-case hex sha256 of the key, never the key itself "
                                     f"(got an entry of {len(str(digest))} characters, {redact(str(digest))})")
        return keys

    @property
    def accepted_keys(self) -> dict[str, ApiKey]:
        """The configured keys, plus the demo keys when `demo_keys` is on."""
        return {**(_demo_keys() if self.demo_keys else {}), **self.api_keys}

    @model_validator(mode="after")
    def _tls_pair(self) -> GatewaySettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        return self

    @model_validator(mode="after")
    def _drift_window_holds_enough(self) -> GatewaySettings:
        if self.drift_min_observations > self.drift_window:
            raise ValueError(f"drift_min_observations ({self.drift_min_observations}) > drift_window ({self.drift_window}): "
                             "PSI would never be computed")
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


Metric = Literal["recall@10", "recall@20", "ndcg@10", "mrr"]
"""The offline ranking metrics (export/metrics.py METRIC_NAMES; a unit test keeps the two equal)."""


class GateSettings(_Section):
    """The promotion gate of `vitrine export` (export/gate.py): what a candidate model must achieve to be exported.

    Margins and tolerances are relative (fractions of the reference's value), so one policy fits data sets whose
    metrics differ by an order of magnitude. `vitrine export` flags override them for one run.
    """

    metric: Metric = Field("recall@10", description="The metric every check compares (and that names the strongest baseline).")
    margin: float = Field(
        0.02, ge=0, lt=1,
        description="The candidate must reach the strongest baseline × (1 + margin) overall: a model that only ties a "
                    "transition table cannot justify Triton and an A/B test.")
    champion_tolerance: float = Field(
        0.01, ge=0, lt=1,
        description="The candidate may fall below the served champion (measured on the same data) by at most this fraction.")
    slice_tolerance: float = Field(
        0.05, ge=0, lt=1,
        description="In a slice (history length, head/long tail) the candidate may fall below the strongest baseline or "
                    "the champion by at most this fraction: an average gain must not hide a worse-served group.")
    min_slice_rows: int = Field(50, ge=1, le=1_000_000, description="Slices with fewer validation targets are shown but not judged (too noisy).")


class RegistrySettings(_Section):
    """The model registry: an MLflow tracking server with its model registry (`export/registry.py` owns the names).

    The local stack runs it as the `mlflow` component (SQLite backend and artifacts under the stack home);
    production points `url` at its own server. Clients talk HTTP only (artifacts are proxied by the server),
    so nothing assumes a filesystem shared with it.
    """

    host: Host = "127.0.0.1"
    port: Port = 15050
    url: str = Field(
        "", pattern=r"^(https?://[^\s/]+(/[^\s]*)?)?$",
        description="The registry's base URL; empty: the local stack's server at http://host:port. "
                    "Production sets it (e.g. https://mlflow.internal).")
    experiment: str = Field("vitrine-training", pattern=r"^[A-Za-z0-9_.\-/ ]{1,200}$",
                            description="MLflow experiment that holds every training run.")
    workers: int = Field(1, ge=1, le=16, description="Server worker processes on the local stack (each holds ~150 MB; 2 cores here).")
    timeout_s: float = Field(
        10.0, gt=0, le=300,
        description="Bound on one registry HTTP call (also how long the gateway waits for a version's metadata).")
    probe_timeout_s: float = Field(
        3.0, gt=0, le=60, description="How long `vitrine train|export` wait to learn whether the registry is reachable at all.")

    @property
    def tracking_url(self) -> str:
        return self.url.rstrip("/") or f"http://{self.host}:{self.port}"


class AlertmanagerSettings(_Section):
    """Alertmanager (the `alertmanager` stack component): Prometheus sends it firing alerts; it routes those
    labelled `action: retrain` to the pipeline trigger's webhook and drops the rest (deploy/alertmanager/)."""

    host: Host = "127.0.0.1"
    port: Port = 19793
    group_wait_s: int = Field(
        30, ge=0, le=3600,
        description="First notification of a new group waits this long for more alerts of the same name to join it.")
    group_interval_s: int = Field(300, ge=1, le=86400, description="A group that changed is notified again at most this often.")
    repeat_interval_s: int = Field(
        4 * 3600, ge=60, le=30 * 86400,
        description="An unchanged, still firing group is re-sent this often: a retrain takes well under 4 h, so a repeat "
                    "means the first trigger did not fix the drift.")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


Architecture = Literal["gru4rec", "sasrec"]
LrSchedule = Literal["constant", "cosine"]
"""How the learning rate moves over a training run (export/train.py `lr_factor`)."""
ModelPrefix = Annotated[str, Field(pattern=r"^([a-z][a-z0-9_]{0,31})?$")]


class PipelineSettings(_Section):
    """`vitrine pipeline run`: validate the archive's newest window → train → evaluate against the served champion
    → gate → export and load the challenger (docs/pipeline.md). Every threshold of the data checks lives here."""

    models: tuple[Architecture, ...] = Field(("gru4rec", "sasrec"), min_length=1, description="Architectures trained per run.")
    model_prefix: ModelPrefix = Field(
        "", description="Repository model name = prefix + architecture (tests use a private prefix; empty in production).")
    archive_root: Path | None = Field(
        None, description="The archive runs read; unset: the archive consumer's (`Settings.archive_root`). Set it where training "
                          "reads a copy of the archive (a replica, another store's mount), or, in the test stack, a fixed one.")
    window_days: int = Field(14, ge=1, le=365, description="Trailing window of the archive (UTC dates) a run trains on.")
    # --- data checks (validate step) ---
    min_events: int = Field(1000, ge=10, le=1_000_000_000, description="Fewer events in the window stop the run.")
    volume_min_ratio: float = Field(
        0.5, ge=0, le=1,
        description="Events in the window ÷ events in the previous window of the same length must be at least this "
                    "(a broken producer or a lost partition shows as a drop). Not judged when the previous window is empty.")
    volume_max_ratio: float = Field(3.0, ge=1, le=1000, description="…and at most this (a replay or a bot shows as a jump).")
    max_unknown_item_share: float = Field(
        0.5, ge=0, le=1,
        description="Share of events whose item the champion's vocabulary does not know: above it the catalogue changed so "
                    "much that the champion comparison says little. Not judged without a champion.")
    min_events_per_type: int = Field(1, ge=0, le=1_000_000_000, description="Each event type (view, click, add_to_cart, purchase) needs this many events.")
    max_empty_hour_share: float = Field(
        0.25, ge=0, le=1,
        description="Share of hours between the window's first and last event without any event: a gap means a consumer or "
                    "producer outage, and a model trained across it learns the outage.")
    max_future_skew_s: float = Field(300.0, ge=0, le=86_400, description="Events later than now + this are future timestamps: the run stops.")
    # --- training ---
    epochs: int | None = Field(None, ge=1, le=1000, description="Unset (also batch_size, learning_rate): per architecture (export/train.py DEFAULTS).")
    batch_size: int | None = Field(None, ge=1, le=65536)
    learning_rate: float | None = Field(None, gt=0, lt=1)
    lr_schedule: LrSchedule = Field("cosine", description="Learning rate over the run (export/train.py lr_factor).")
    warmup: float = Field(0.05, ge=0, lt=1, description="Share of the training steps over which the learning rate ramps up linearly.")
    dim: int | None = Field(None, ge=4, le=1024, description="Embedding size; unset: per architecture (export/train.py DEFAULT_DIM).")
    max_len: int = Field(20, ge=2, le=512, description="History steps the model sees.")
    validation_fraction: float = Field(0.1, ge=0.01, le=0.5, description="The newest share of the window is the held-out slice.")
    seed: int = Field(7, ge=0)
    threads: int = Field(2, ge=1, le=64, description="Torch threads while training.")
    # --- gate against the champion ---
    champion_margin: float = Field(
        0.01, ge=0, lt=1,
        description="The candidate must beat the served champion on the gate's metric by this relative margin; the other "
                    "metrics may fall at most gate.champion_tolerance below it, and no slice beyond gate.slice_tolerance.")
    gate_baselines: tuple[Literal["popularity", "transitions", "cooccurrence"], ...] = Field(
        ("popularity", "transitions", "cooccurrence"), min_length=1,
        description="Baselines the candidate must beat (the strongest of them by gate.margin, and in every slice). Dropping "
                    "one is a deliberate, recorded choice, e.g. where a transition table cannot be served.")
    category_source: Literal["synthetic", "none"] = Field(
        "synthetic", description="How item ids map to categories for the per-category slices: the synthetic storefront's "
                                 "i<n> ids (export/data/synthetic.py), or none (the category slices are skipped and the record says so).")
    category_preset: str = Field("default", pattern=r"^[a-z]{1,16}$", description="Synthetic storefront preset whose categories apply.")
    category_seed: int = Field(7, ge=0, description="…and its seed.")
    # --- export ---
    max_k: int = Field(50, ge=1, le=1000, description="Items returned by the exported graph's top-k.")
    keep_versions: int = Field(3, ge=1, le=100, description="Versions kept on disk and served per model.")
    reproduce_tolerance: float = Field(1e-6, ge=0, le=0.1, description="`vitrine pipeline reproduce`: largest |Δmetric| that still counts as equal.")


class TriggersSettings(_Section):
    """The trigger service (`vitrine triggers run`): Alertmanager's webhook and an optional schedule start pipeline runs."""

    host: Host = "127.0.0.1"
    port: Port = Field(19800, description="HTTP: POST /alerts, GET /healthz, GET /metrics.")
    token_file: Path | None = Field(
        None, description="File holding the bearer token Alertmanager sends; unset: `<stack.home>/triggers/token`, "
                          "created with a random token by `vitrine stack up`.")
    debounce_s: float = Field(3600.0, ge=0, le=30 * 86_400, description="No new run starts within this long after the last one started.")
    dedupe_ttl_s: float = Field(
        86_400.0, gt=0, le=30 * 86_400,
        description="How long a notification's identity (groupKey + firing alerts) is remembered: a repeat inside it is a duplicate.")
    schedule_interval_s: float | None = Field(
        None, ge=60, le=365 * 86_400, description="Start a scheduled run this often (unset: no schedule).")
    action_label: str = Field("retrain", min_length=1, max_length=64, description="Only firing alerts labelled action=<this> start a run.")
    max_body_bytes: int = Field(1 << 20, ge=1024, le=64 << 20, description="Larger webhook bodies are refused (413).")



def _parse_steps(steps: object) -> object:
    """Steps as given in a config file, env (JSON) or `--steps 1,5,25` text; validated by `check_steps`."""
    if isinstance(steps, str):
        try:
            return tuple(int(part) for part in steps.split(",") if part.strip())
        except ValueError as exc:
            raise ValueError(f"steps are comma-separated whole percentages, e.g. 1,5,25,50,100 (got {steps!r})") from exc
    return steps


def check_steps(steps: tuple[int, ...]) -> tuple[int, ...]:
    """A rollout's steps: whole percentages of traffic, strictly increasing, within 1..100, ending at 100."""
    if not steps:
        raise ValueError("steps must name at least one percentage (the last must be 100)")
    out_of_range = [s for s in steps if not 1 <= s <= 100]
    if out_of_range:
        raise ValueError(f"steps are percentages in 1..100, got {out_of_range}")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"steps must increase strictly, got {list(steps)}")
    if steps[-1] != 100:
        raise ValueError(f"the last step must be 100 (the challenger serves everybody), got {steps[-1]}")
    return tuple(steps)


class RolloutSettings(_Section):
    """Progressive rollouts (`vitrine rollout start`, `vitrine rollouts run`; services/rollouts/, docs/rollouts.md): the
    challenger's share grows step by step while the judge compares it with control over the same window."""

    steps: tuple[int, ...] = Field(
        (1, 5, 25, 50, 100), min_length=1, max_length=20,
        description="Default steps: the challenger's share of traffic in %, strictly increasing, ending at 100.")
    hold_s: float = Field(600.0, ge=1, le=7 * 86_400, description="Default time each step is held before it is judged.")
    interval_s: float = Field(5.0, gt=0, le=3600, description="How often the controller loads the rollout's state and acts.")
    min_window_s: float = Field(
        10.0, ge=1, le=86_400,
        description="Shortest window the serving figures are read over (Prometheus needs a few scrapes for a rate): a step "
                    "lasts max(hold, this) and is judged over that window, which so never reaches into the step before.")
    min_requests: int = Field(
        50, ge=1, le=100_000_000,
        description="Fewest requests the challenger AND control must each have answered in the window to be compared; "
                    "fewer: hold (judge again at the next interval).")
    p99_ratio: float = Field(
        1.5, ge=1, le=100,
        description="The challenger's p99 may be at most control's p99 × this (+ p99_slack_s) over the same window: a "
                    "machine-wide spike raises both and does not roll back.")
    p99_slack_s: float = Field(
        0.005, ge=0, le=10, description="Absolute slack on the p99 comparison (seconds): millisecond noise on a fast control is not a breach.")
    error_ratio_slack: float = Field(
        0.01, ge=0, le=1, description="The challenger's error ratio may exceed control's by at most this (absolute).")
    degraded_ratio_slack: float = Field(
        0.05, ge=0, le=1, description="The challenger's degraded ratio may exceed control's by at most this (absolute).")
    require_non_inferior: bool = Field(
        False,
        description="Also require every outcome guardrail to be shown non-inferior before a step advances (otherwise only "
                    "'worse' counts: it rolls back). Needs enough exposed users; off by default.")
    variant: str = Field("challenger", pattern=r"^[a-z0-9_-]{1,32}$", description="Name of the experiment variant the challenger is served as.")
    metrics_host: Host = "127.0.0.1"
    metrics_port: Port = Field(19850, description="The controller's /metrics (`vitrine rollouts run`).")
    prometheus_timeout_s: float = Field(5.0, gt=0, le=120, description="Bound on one Prometheus query of the controller.")
    triton_timeout_s: float = Field(5.0, gt=0, le=120, description="Bound on one readiness call to Triton.")

    @field_validator("steps", mode="before")
    @classmethod
    def _steps_from_text(cls, steps: object) -> object:
        return _parse_steps(steps)

    @field_validator("steps")
    @classmethod
    def _valid_steps(cls, steps: tuple[int, ...]) -> tuple[int, ...]:
        return check_steps(steps)


class StackSettings(_Section):
    home: Path = Field(REPO_ROOT / ".stack", description="State, configs and one log file per component.")
    cache: Path = Field(
        Path(os.environ.get("VITRINE_CACHE", Path.home() / ".cache" / "vitrine")),
        description="Where deploy/setup.sh put Kafka's jars and the Triton binary.",
    )
    kafka_version: str = "4.1.1"
    pytriton_version: str = "0.7.0"
    startup_timeout_s: float = Field(
        120.0, gt=0, le=1800,
        description="Upper bound for one component to turn healthy. The slowest first start is MLflow's (database "
                    "migrations, ~20 s on 2 cores; Triton loading every model is next): 120 s leaves room on a busy machine.")
    stop_timeout_s: float = Field(30.0, gt=0, le=600)
    log_tail_lines: int = Field(30, ge=1, le=10_000, description="Log lines shown when a component fails.")
    demo_keys: bool = Field(True, description="The local stack's gateway accepts the published demo keys (README) and serves reflection.")


class Settings(BaseSettings):
    """All of Vitrine's configuration; construct once per process and pass it down."""

    model_config = SettingsConfigDict(
        env_prefix="VITRINE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    redis: RedisSettings = RedisSettings()
    redis_exporter: RedisExporterSettings = RedisExporterSettings()
    kafka: KafkaSettings = KafkaSettings()
    triton: TritonSettings = TritonSettings()
    prometheus: PrometheusSettings = PrometheusSettings()
    features: FeaturesSettings = FeaturesSettings()
    outcomes: OutcomesSettings = OutcomesSettings()
    archive: ArchiveSettings = ArchiveSettings()
    gateway: GatewaySettings = GatewaySettings()
    gate: GateSettings = GateSettings()
    registry: RegistrySettings = RegistrySettings()
    alertmanager: AlertmanagerSettings = AlertmanagerSettings()
    pipeline: PipelineSettings = PipelineSettings()
    triggers: TriggersSettings = TriggersSettings()
    rollouts: RolloutSettings = RolloutSettings()
    stack: StackSettings = StackSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise FileNotFoundError(f"{CONFIG_FILE_ENV}={config_file!r} does not name a readable file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    def shifted(self, offset: int) -> Settings:
        """A copy with every port moved by `offset` and its own stack folder: a second, independent stack."""
        update: dict[str, object] = {}
        for section_name in type(self).model_fields:
            section = getattr(self, section_name)
            ports = {
                name: value + offset
                for name, value in section.model_dump().items()
                if name == "port" or name.endswith("_port")
            }
            if any(not 1 <= port <= 65535 for port in ports.values()):
                raise ValueError(f"port offset {offset} moves a {section_name} port out of 1..65535")
            if ports:
                update[section_name] = section.model_copy(update=ports)
        update["stack"] = self.stack.model_copy(update={"home": self.stack.home.with_name(f"{self.stack.home.name}-{offset}")})
        return self.model_copy(update=update)

    @property
    def archive_root(self) -> Path:
        """Where the archive lives: `archive.root`, or `archive/` in the stack's home (a test stack gets its own)."""
        return (self.archive.root or self.stack.home / "archive").expanduser().resolve()

    @property
    def pipeline_archive_root(self) -> Path:
        """The archive pipeline runs read: `pipeline.archive_root`, or the archive consumer's."""
        return self.pipeline.archive_root.expanduser().resolve() if self.pipeline.archive_root else self.archive_root

    @property
    def pipeline_home(self) -> Path:
        """Pipeline runs (`runs/<run_id>/record.json` and artefacts) and the lock file: `<stack.home>/pipeline`."""
        return self.stack.home / "pipeline"

    @property
    def triggers_token_file(self) -> Path:
        return (self.triggers.token_file or self.stack.home / "triggers" / "token").expanduser().resolve()

    @property
    def kafka_home(self) -> Path:
        return self.stack.cache / f"kafka-{self.stack.kafka_version}"

    @property
    def triton_home(self) -> Path:
        return self.stack.cache / f"triton-pytriton-{self.stack.pytriton_version}"

    @field_validator("stack")
    @classmethod
    def _absolute_home(cls, stack: StackSettings) -> StackSettings:
        return stack.model_copy(update={"home": stack.home.resolve(), "cache": stack.cache.expanduser().resolve()})
