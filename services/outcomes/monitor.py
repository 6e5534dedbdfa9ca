"""The experiment monitor: the current experiment looked at every `monitor_interval_s`, beside the join.

Each look (`looks.take`, the same as `vitrine ab report`'s) pools the rows of every revision of the current
phase (one hypothesis: ramps stay in it), analyses them, updates the decision's evidence in Redis (running
minima of the always-valid p-values, intersected confidence sequences, the sticky SRM flag — one α for the
whole experiment, not one per revision), exports gauges for dashboards and alerts (users per variant, the
always-valid SRM p-value, relative lifts, always-valid p-values, the interleaving preference), and appends
the look to the revision's history (the report draws intervals over time from it).

The analysis runs in a worker thread: at 100k users it takes tens of milliseconds of numpy, which must not
hold the consumer's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time

from vitrine.experiments.decision import INTERLEAVING_KEY, Decision
from vitrine.services.gateway.experiment import ExperimentStore
from vitrine.services.gateway.metrics import label_sets
from vitrine.services.outcomes import looks
from vitrine.services.outcomes.looks import Look
from vitrine.services.outcomes.metrics import OutcomeMetrics
from vitrine.services.outcomes.store import OutcomeStore
from vitrine.settings import OutcomesSettings

log = logging.getLogger(__name__)


def snapshot_of(look: Look, now_ms: int) -> dict:
    """One look, as stored in the history and exported as gauges: this look's lifts, and the decision's
    always-valid p-values (running minima over every look of the phase)."""
    experiment = look.experiment
    snap: dict = {"ts_ms": now_ms, "revision": experiment.revision, "mode": experiment.mode, "phase": look.phase}
    d: Decision | None = look.decision
    if look.analysis is not None and d is not None:
        snap["users"] = {v.variant: v.users for v in look.analysis.variants}
        snap["srm_p_value"] = d.srm_p_value
        snap["srm_flagged"] = d.srm_flagged
        snap["lift"] = {f"{c.variant}:{c.metric}": [c.relative.estimate, c.relative.low, c.relative.high] for c in look.analysis.comparisons}
        snap["sequential_p"] = {f"{c.variant}:{c.metric}": c.p_value for c in d.comparisons}
        snap["adjusted_p"] = {f"{c.variant}:{c.metric}": c.adjusted_p for c in d.comparisons}
        snap["guardrails"] = {f"{g.variant}:{g.metric}": g.status for g in d.guardrails}
        snap["verdict"] = d.text
    if look.interleaving is not None and d is not None:
        i = look.interleaving
        snap["preference"] = {i.team_a: i.preference_a, i.team_b: 1 - i.preference_a}
        snap["preference_p_value"] = look.evidence.keys[INTERLEAVING_KEY].p if look.evidence else i.sequential_p
        snap["users"] = {"interleaved": i.users}
        snap["verdict"] = d.text
    return snap


class ExperimentMonitor:
    def __init__(self, store: OutcomeStore, experiments: ExperimentStore, metrics: OutcomeMetrics, settings: OutcomesSettings) -> None:
        self.store = store
        self.experiments = experiments
        self.metrics = metrics
        self.settings = settings
        self._exported: tuple[str, int] | None = None

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.monitor_interval_s)
            try:
                self.metrics.evaluations.labels(await self.look()).inc()
            except Exception as exc:  # noqa: BLE001 - monitoring must never stop the join
                self.metrics.evaluations.labels("failed").inc()
                log.warning("experiment monitor failed: %s", exc)

    async def look(self) -> str:
        """Look at the current experiment once; returns what happened (the `result` label)."""
        experiment = await self.experiments.load()
        if experiment is None:
            return "no_experiment"
        if self._exported != (experiment.name, experiment.revision):
            self._clear()  # a new revision: the old one's figures must not linger beside the new
            self._exported = (experiment.name, experiment.revision)
        look = await looks.take(self.store, self.experiments, experiment, self.settings)
        if look.evidence is None:
            return look.status
        await self.store.save_evidence(experiment.name, look.phase[0], look.evidence.to_dict())
        snap = snapshot_of(look, int(time.time() * 1000))
        self._export(experiment.name, snap)
        await self.store.append_snapshot(experiment.name, experiment.revision, snap, self.settings.monitor_history)
        return "ok"

    def _export(self, name: str, look: dict) -> None:
        m = self.metrics
        for variant, users in look.get("users", {}).items():
            m.experiment_users.labels(name, variant).set(users)
        if "srm_p_value" in look:
            m.srm_p_value.labels(name).set(look["srm_p_value"])
        for key, bounds in look.get("lift", {}).items():
            variant, metric = key.split(":", 1)
            for bound, value in zip(("estimate", "low", "high"), bounds, strict=True):
                m.relative_lift.labels(name, variant, metric, bound).set(value)
        for key, p in look.get("sequential_p", {}).items():
            variant, metric = key.split(":", 1)
            m.sequential_p_value.labels(name, variant, metric).set(p)
        for team, share in look.get("preference", {}).items():
            m.interleaving_preference.labels(name, team).set(share)

    def _clear(self) -> None:
        for gauge, names in ((self.metrics.experiment_users, ("experiment", "variant")), (self.metrics.srm_p_value, ("experiment",)),
                             (self.metrics.relative_lift, ("experiment", "variant", "metric", "bound")),
                             (self.metrics.sequential_p_value, ("experiment", "variant", "metric")),
                             (self.metrics.interleaving_preference, ("experiment", "team"))):
            for labels in label_sets(gauge, names):
                gauge.remove(*labels)
