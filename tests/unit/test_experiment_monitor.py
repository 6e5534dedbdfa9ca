"""The experiment monitor's look, without services: what it stores and exports from given rows."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry

from vitrine.contracts.outcomes import InterleavedOutcome, UserOutcome
from vitrine.experiments.analysis import analyse
from vitrine.experiments.decision import Evidence
from vitrine.experiments.interleaving import analyse_interleaving
from vitrine.services.gateway.experiment import Experiment, Variant
from vitrine.services.gateway.metrics import label_sets
from vitrine.services.outcomes.looks import Look, conclude
from vitrine.services.outcomes.metrics import OutcomeMetrics
from vitrine.services.outcomes.monitor import ExperimentMonitor, snapshot_of
from vitrine.settings import OutcomesSettings

EXPERIMENT = Experiment(name="exp", salt="s", revision=4, variants=(
    Variant(name="control", model_name="popularity", weight=50), Variant(name="treatment", model_name="gru4rec", weight=50)))


def _rows(n: int, seed: int = 1) -> list[UserOutcome]:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n):
        variant = "control" if u % 2 else "treatment"
        impressions = int(rng.integers(5, 30))
        ctr = 0.05 if variant == "control" else 0.09
        clicks = int(rng.binomial(impressions, ctr))
        rows.append(UserOutcome(f"u{u}", variant, exposures=impressions // 5, impressions=impressions, clicks=clicks,
                                add_to_carts=clicks // 2, purchases=clicks // 4, pre_events=int(rng.integers(0, 9))))
    return rows


def _look(analysis, interleaving=None, evidence: Evidence | None = None, experiment: Experiment = EXPERIMENT) -> Look:  # noqa: ANN001
    return conclude(Look(experiment, [4], {}, analysis, interleaving), evidence or Evidence("exp", 4), {"conversion": 0.05}, 1)


def test_a_look_keeps_the_running_minimum_of_the_always_valid_p_value() -> None:
    analysis = analyse(_rows(2000), {"control": 50, "treatment": 50}, "control")
    look = _look(analysis)
    first = snapshot_of(look, 1)
    key = "treatment:ctr"
    assert first["users"] == {"control": 1000, "treatment": 1000} and key in first["lift"]
    low, high = first["lift"][key][1:]
    assert low < first["lift"][key][0] < high and low > 0  # a planted +80 % CTR is found
    earlier = Evidence.from_dict(look.evidence.to_dict())
    earlier.keys[key].p = 1e-30
    second = snapshot_of(_look(analysis, evidence=earlier), 2)
    assert second["sequential_p"][key] == 1e-30  # never rises above an earlier look's
    assert 0 <= first["srm_p_value"] <= 1


def test_gauges_of_an_old_revision_are_cleared_when_a_new_one_starts() -> None:
    metrics = OutcomeMetrics(CollectorRegistry())
    monitor = ExperimentMonitor(store=None, experiments=None, metrics=metrics, settings=OutcomesSettings())  # type: ignore[arg-type]
    look = snapshot_of(_look(analyse(_rows(200), {"control": 50, "treatment": 50}, "control")), 1)
    monitor._export("exp", look)
    assert ("exp", "treatment", "ctr", "low") in label_sets(metrics.relative_lift, ("experiment", "variant", "metric", "bound"))
    monitor._clear()
    assert not label_sets(metrics.relative_lift, ("experiment", "variant", "metric", "bound"))
    assert not label_sets(metrics.srm_p_value, ("experiment",))


def test_an_interleaved_look_exports_each_teams_preference() -> None:
    rows = [InterleavedOutcome(f"u{n}", "a", "b", clicks_a=3, clicks_b=1, wins_a=2 if n % 4 else 0, wins_b=0 if n % 4 else 1, ties=0)
            for n in range(400)]
    look = snapshot_of(_look(None, analyse_interleaving(rows), experiment=EXPERIMENT.model_copy(update={"mode": "interleave"})), 1)
    assert look["preference"]["a"] == 0.75 and look["preference"]["b"] == 0.25 and look["preference_p_value"] < 1e-6
