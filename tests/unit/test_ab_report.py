"""`vitrine ab report`'s assembly and verdict, without services (the live report is tested in
tests/integration/test_ab_report.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vitrine.contracts.outcomes import UserOutcome
from vitrine.experiments.analysis import analyse
from vitrine.experiments.decision import Evidence
from vitrine.experiments.report import Guardrail, Report, plot_history
from vitrine.services.gateway.experiment import Experiment, Variant
from vitrine.services.outcomes.looks import Look, conclude
from vitrine.services.outcomes.monitor import snapshot_of

WEIGHTS = {"control": 50, "treatment": 50}
EXPERIMENT = Experiment(name="exp", salt="s", revision=2, variants=(
    Variant(name="control", model_name="popularity", weight=50), Variant(name="treatment", model_name="gru4rec", weight=50)))


def _rows(n: int, treatment_ctr: float, share_treatment: float = 0.5, seed: int = 3) -> list[UserOutcome]:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n):
        variant = "treatment" if rng.random() < share_treatment else "control"
        impressions = int(rng.integers(6, 40))
        clicks = int(rng.binomial(impressions, treatment_ctr if variant == "treatment" else 0.04))
        rows.append(UserOutcome(f"u{u}", variant, impressions // 6, impressions, clicks, clicks // 2, clicks // 5, int(rng.integers(0, 5))))
    return rows


def _look(rows: list[UserOutcome], evidence: Evidence | None = None, now_ms: int = 0) -> Look:
    look = Look(EXPERIMENT, [2], {}, analyse(rows, WEIGHTS, "control", tau2=evidence.tau2() if evidence else None))
    return conclude(look, evidence or Evidence("exp", 2), {"conversion": 0.05}, now_ms)


def _report(rows: list[UserOutcome], history: list[dict] | None = None) -> Report:
    look = _look(rows)
    guardrails = [Guardrail("control", 10.0, 0.008, 0.01, 0.0), Guardrail("treatment", 10.0, 0.011, 0.0, 0.0)]
    return Report("exp", 2, "ab", WEIGHTS, look.analysis, None, guardrails, history or [], look.decision, [2])


def test_a_clear_winner_is_named_with_its_interval() -> None:
    report = _report(_rows(3000, 0.08))
    assert report.verdict().startswith("treatment wins on CTR")
    text = report.table()
    assert "serving" in text and "guardrails (non-inferiority" in text and "verdict: treatment wins" in text
    json.dumps(report.to_dict(), default=float)  # machine-readable


def test_no_difference_is_not_called_a_win() -> None:
    assert "no decision yet" in _report(_rows(3000, 0.04)).verdict()


def test_a_broken_split_is_reported_instead_of_a_winner() -> None:
    report = _report(_rows(4000, 0.08, share_treatment=0.56))
    assert report.analysis is not None and report.analysis.srm.flagged
    assert report.verdict().startswith("sample ratio mismatch")


def test_the_lift_over_time_is_drawn(tmp_path: Path) -> None:
    rows = _rows(2000, 0.06)
    history: list[dict] = []
    evidence = None
    for n in (200, 600, 1200, 2000):
        look = _look(rows[:n], evidence, 60_000 * len(history))
        evidence = look.evidence
        history.append(snapshot_of(look, 60_000 * len(history)))
    report = _report(rows, history)
    out = tmp_path / "report.png"
    plot_history(report, out)
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
