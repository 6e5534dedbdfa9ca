"""The experiment monitor: the current revision analysed every `monitor_interval_s`, beside the join.

Each look reads the per-user rows the join wrote, runs the same analysis as `vitrine ab report`
(`vitrine.experiments`), exports gauges for dashboards and alerts (users per variant, the SRM p-value,
relative lifts with their intervals, always-valid p-values, the interleaving preference), and appends
the look to the revision's history in Redis (the report draws intervals over time from it).

The always-valid p-value exported is the running minimum over this monitor's looks: the mSPRT's
p-value process is valid at any stopping time, and its running minimum is the always-valid p-value
(Johari et al., "Always Valid Inference", Operations Research 2022, §3) — so an experimenter may read
the dashboard every minute without inflating the false-positive rate.

The analysis runs in a worker thread: at 100k users it takes tens of milliseconds of numpy, which
must not hold the consumer's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time

from vitrine.contracts.exposures import INTERLEAVE
from vitrine.experiments.analysis import ExperimentAnalysis, analyse
from vitrine.experiments.interleaving import InterleavingResult, analyse_interleaving
from vitrine.services.gateway.experiment import Experiment, ExperimentStore
from vitrine.services.gateway.metrics import label_sets
from vitrine.services.outcomes.metrics import OutcomeMetrics
from vitrine.services.outcomes.store import OutcomeStore

log = logging.getLogger(__name__)
MIN_USERS_PER_VARIANT = 2
"""Below this a variant has no variance to estimate: the look is skipped (counted as `too_few_users`)."""


def snapshot_of(experiment: Experiment, analysis: ExperimentAnalysis | None, preference: InterleavingResult | None,
                last: dict | None, now_ms: int) -> dict:
    """One look, as stored in the history and exported as gauges. Its p-values are running minima: the
    `last` look already holds the minimum over every look before it, so it is the only one needed."""
    look: dict = {"ts_ms": now_ms, "revision": experiment.revision, "mode": experiment.mode}
    if analysis is not None:
        earlier: dict[str, float] = (last or {}).get("sequential_p", {})
        look["users"] = {v.variant: v.users for v in analysis.variants}
        look["srm_p_value"] = analysis.srm.p_value
        look["lift"] = {f"{c.variant}:{c.metric}": [c.relative.estimate, c.relative.low, c.relative.high] for c in analysis.comparisons}
        look["sequential_p"] = {f"{c.variant}:{c.metric}": min(earlier.get(f"{c.variant}:{c.metric}", 1.0), c.sequential.p_value)
                                for c in analysis.comparisons}
    if preference is not None:
        look["preference"] = {preference.team_a: preference.preference_a, preference.team_b: 1 - preference.preference_a}
        look["preference_p_value"] = preference.p_value
        look["users"] = {"interleaved": preference.users}
    return look


class ExperimentMonitor:
    def __init__(self, store: OutcomeStore, experiments: ExperimentStore, metrics: OutcomeMetrics, interval_s: float, history: int) -> None:
        self.store = store
        self.experiments = experiments
        self.metrics = metrics
        self.interval_s = interval_s
        self.history = history
        self._exported: tuple[str, int] | None = None

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.metrics.evaluations.labels(await self.look()).inc()
            except Exception as exc:  # noqa: BLE001 - monitoring must never stop the join
                self.metrics.evaluations.labels("failed").inc()
                log.warning("experiment monitor failed: %s", exc)

    async def look(self) -> str:
        """Analyse the current revision once; returns what happened (the `result` label)."""
        experiment = await self.experiments.load()
        if experiment is None:
            return "no_experiment"
        if self._exported != (experiment.name, experiment.revision):
            self._clear()  # a new revision: the old one's figures must not linger beside the new
            self._exported = (experiment.name, experiment.revision)
        analysis = preference = None
        if experiment.mode == INTERLEAVE:
            rows = await self.store.interleaved_outcomes(experiment.name, experiment.revision)
            if not rows:
                return "no_outcomes"
            preference = await asyncio.to_thread(analyse_interleaving, rows)
        else:
            rows = await self.store.user_outcomes(experiment.name, experiment.revision)
            control = experiment.variants[0].name
            counts = {v.name: sum(1 for r in rows if r.variant == v.name) for v in experiment.variants}
            if counts.get(control, 0) < MIN_USERS_PER_VARIANT or not any(
                    n >= MIN_USERS_PER_VARIANT for name, n in counts.items() if name != control):
                return "too_few_users"
            weights = {v.name: v.weight for v in experiment.variants}
            analysis = await asyncio.to_thread(analyse, rows, weights, control)
        last = await self.store.last_snapshot(experiment.name, experiment.revision)
        look = snapshot_of(experiment, analysis, preference, last, int(time.time() * 1000))
        self._export(experiment.name, look)
        await self.store.append_snapshot(experiment.name, experiment.revision, look, self.history)
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
