"""One look at an experiment, the same for the monitor and `vitrine ab report`: the phase's revisions, their
rows pooled per user, the analysis, and the decision given the evidence of earlier looks.

The monitor stores the updated evidence (`OutcomeStore.save_evidence`); the report reads it and adds its own
look in memory only, so reading the report never changes what the monitor decides.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from vitrine.contracts.exposures import INTERLEAVE
from vitrine.experiments import decision
from vitrine.experiments.analysis import ExperimentAnalysis, analyse
from vitrine.experiments.interleaving import InterleavingResult, analyse_interleaving
from vitrine.experiments.revisions import RevisionConfig, phase, pool, pool_interleaved
from vitrine.services.gateway.experiment import Experiment, ExperimentStore
from vitrine.services.outcomes.store import OutcomeStore
from vitrine.settings import OutcomesSettings

MIN_USERS_PER_VARIANT = 2
"""Below this a variant has no variance to estimate: the look has no analysis (`too_few_users`)."""
AUDIT_LOOK_BACK = 1000
"""Audit entries read per look (newest first): a phase longer than this many revisions ends there."""


@dataclass
class Look:
    experiment: Experiment
    phase: list[int]
    """The revisions this look pools (one hypothesis, one α)."""
    configs: dict[int, RevisionConfig]
    analysis: ExperimentAnalysis | None = None
    interleaving: InterleavingResult | None = None
    evidence: decision.Evidence | None = None
    """The evidence including this look."""
    decision: decision.Decision | None = None
    status: str = "ok"
    notes: list[str] = field(default_factory=list)


async def revision_configs(experiments: ExperimentStore, current: Experiment) -> dict[int, RevisionConfig]:
    """Every revision's configuration the newest audit entries remember (each entry's old and new), and the current one."""
    configs: dict[int, RevisionConfig] = {}
    for entry in await experiments.audit(AUDIT_LOOK_BACK):
        for side in ("old", "new"):
            raw = entry.get(side)
            if raw:
                try:
                    stored = Experiment.model_validate(raw)
                except ValueError:
                    continue  # an entry written under older rules: its revision is unknown, which ends a phase
                configs.setdefault(stored.revision, RevisionConfig.of(stored))
    configs[current.revision] = RevisionConfig.of(current)
    return configs


async def take(store: OutcomeStore, experiments: ExperimentStore, experiment: Experiment, cfg: OutcomesSettings,
               evidence: decision.Evidence | None = None) -> Look:
    """Analyse the phase ending at `experiment.revision` and decide; `evidence` None: read the stored one."""
    configs = await revision_configs(experiments, experiment)
    revisions = phase(configs, experiment.revision)
    look = Look(experiment, revisions, configs)
    if evidence is None:
        stored = await store.load_evidence(experiment.name, revisions[0])
        evidence = decision.Evidence.from_dict(stored) if stored else decision.Evidence(experiment.name, revisions[0])
    if experiment.mode == INTERLEAVE:
        by_revision = {r: await store.interleaved_outcomes(experiment.name, r) for r in revisions}
        rows = pool_interleaved(by_revision, revisions)
        if not rows:
            look.status = "no_outcomes"
            return look
        look.interleaving = await asyncio.to_thread(analyse_interleaving, rows, planned_votes=cfg.planned_votes)
    else:
        listed = await store.revisions(experiment.name)
        by_revision = {r: await store.user_outcomes(experiment.name, r) for r in sorted(set(listed) | set(revisions)) if r <= revisions[-1]}
        pooled = pool(by_revision, revisions, listed)
        control = experiment.variants[0].name
        counts = {v.name: sum(1 for r in pooled.rows if r.variant == v.name) for v in experiment.variants}
        if counts.get(control, 0) < MIN_USERS_PER_VARIANT or not any(
                n >= MIN_USERS_PER_VARIANT for name, n in counts.items() if name != control):
            look.status = "too_few_users"
            look.notes.append(f"no comparison yet: {len(pooled.rows)} users with outcomes in revisions {revisions}, by variant {counts}")
            return look
        weights = {v.name: v.weight for v in experiment.variants}
        look.analysis = await asyncio.to_thread(
            analyse, pooled.rows, weights, control, strata=pooled.strata,
            stratum_weights={r: configs[r].weights for r in revisions if r in configs},
            covariate_refused=pooled.covariate_refused, planned_users=cfg.planned_users_per_variant, tau2=evidence.tau2())
        if pooled.censored_users:
            look.notes.append(f"{pooled.censored_users} users changed variant within the phase: their rows after the change are left out")
    return conclude(look, evidence, cfg.guardrail_margins, _now_ms())


def conclude(look: Look, evidence: decision.Evidence, margins: Mapping[str, float], now_ms: int) -> Look:
    """The pure end of a look: the evidence with this look added, and the decision it allows."""
    look.evidence = decision.update(evidence, look.analysis, look.interleaving, now_ms)
    look.decision = decision.decide(look.evidence, look.analysis, look.interleaving, margins=margins)
    return look


def _now_ms() -> int:
    return int(time.time() * 1000)
