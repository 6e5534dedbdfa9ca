"""The trigger service's Prometheus metrics: names and labels are defined here and only here.

Labels are bounded: source (alertmanager, schedule), trigger (drift, schedule), reason (a fixed set below),
outcome (the pipeline's final statuses)."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

RECEIVED: Final = "vitrine_triggers_received_total"
STARTED: Final = "vitrine_triggers_runs_started_total"
REJECTED: Final = "vitrine_triggers_rejected_total"
FINISHED: Final = "vitrine_triggers_runs_finished_total"
RUNNING: Final = "vitrine_triggers_run_in_progress"
REASONS: Final = ("unauthorized", "malformed", "too_large", "ignored", "duplicate", "debounced", "busy", "spawn_failed")
"""Why a request or a scheduled tick did not start a run."""


class TriggerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
            return Counter(name.removesuffix("_total"), doc, labels, registry=registry)

        self.received = counter(RECEIVED, "Webhook requests and schedule ticks received, by source.", ("source",))
        self.started = counter(STARTED, "Pipeline runs started, by trigger.", ("trigger",))
        self.rejected = counter(REJECTED, "Requests or ticks that started no run, by reason.", ("reason",))
        self.finished = counter(FINISHED, "Pipeline runs this service started that ended, by outcome (exit status).", ("outcome",))
        self.running = Gauge(RUNNING, "1 while a pipeline run started by this service is in progress.", registry=registry)
        for reason in REASONS:  # every series exists from the start, so that rate() and alerts see 0, not nothing
            self.rejected.labels(reason)
