"""The rollout controller's Prometheus metrics: names and labels live here and only here.

Labels are bounded: `model` (the challenger's model name), `action` (the judge's three and the controller's own:
complete, pause — see ACTIONS), `status` (store.STATUSES)."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from vitrine.services.rollouts.store import STATUSES

STEP: Final = "vitrine_rollout_step_percent"
DECISIONS: Final = "vitrine_rollout_decisions_total"
STATUS: Final = "vitrine_rollout_status"
TICKS_FAILED: Final = "vitrine_rollout_ticks_failed_total"
LAST_DECISION: Final = "vitrine_rollout_last_decision_timestamp_seconds"
LAST_TICK: Final = "vitrine_rollout_last_tick_timestamp_seconds"
"""When the controller last read the rollout state from Redis (the stack's readiness probe: > 0 once it has)."""
ACTIONS: Final = ("advance", "hold", "rollback", "complete", "pause")
"""`pause`: the controller paused the rollout itself (somebody else changed the experiment)."""


class RolloutMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.step = Gauge(STEP, "The challenger's share of traffic the rollout has set (0 once rolled back or aborted).", ("model",),
                          registry=registry)
        self.status = Gauge(STATUS, "1 for the rollout's current status, 0 for the others.", ("status",), registry=registry)
        self.decisions = Counter(DECISIONS.removesuffix("_total"), "Decisions the controller took, by action.", ("action",),
                                 registry=registry)
        self.ticks_failed = Counter(TICKS_FAILED.removesuffix("_total"),
                                    "Controller ticks that could not gather their figures or act (Redis, Prometheus or Triton away).",
                                    registry=registry)
        self.last_decision = Gauge(LAST_DECISION, "When the controller last decided (Unix time, seconds).", registry=registry)
        self.last_tick = Gauge(LAST_TICK, "When the controller last read the rollout's state (Unix time, seconds).", registry=registry)
        for action in ACTIONS:
            self.decisions.labels(action)
        for status in STATUSES:
            self.status.labels(status)

    def show(self, model: str, percent: int, status: str) -> None:
        self.step.labels(model).set(percent)
        for s in STATUSES:
            self.status.labels(s).set(1 if s == status else 0)
