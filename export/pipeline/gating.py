"""Step 4, gate: export/gate.py applied to the pipeline's evaluation — the candidate against the strongest
baseline (from its run record) and against the live champion (re-measured in the evaluate step), overall
and in every slice family. With a champion the candidate must *beat* it by `pipeline.champion_margin`."""

from __future__ import annotations

from vitrine.export.gate import CANDIDATE, CHAMPION, GateDecision, GatePolicy, gate
from vitrine.settings import Settings


def policy(settings: Settings) -> GatePolicy:
    base = GatePolicy.from_settings(settings.gate)
    return GatePolicy(metric=base.metric, margin=base.margin, champion_tolerance=base.champion_tolerance,
                      slice_tolerance=base.slice_tolerance, min_slice_rows=base.min_slice_rows,
                      champion_margin=settings.pipeline.champion_margin)


def decide(run_record: dict, evaluation: dict, gate_policy: GatePolicy, baseline_names: tuple[str, ...] | None = None) -> GateDecision:
    """`run_record`: the candidate's run.json (baselines and their slices); `evaluation`: evaluate.evaluate()'s result;
    `baseline_names`: which of the recorded baselines count (default: all)."""
    baselines = {name: m for name, m in run_record["baselines"]["metrics"].items() if baseline_names is None or name in baseline_names}
    if not baselines:
        raise ValueError(f"none of the baselines {baseline_names} is in the run record")
    slices: dict = {CANDIDATE: evaluation["candidate"]["slices"]}
    slices.update({name: run_record.get("slice_metrics", {}).get(name, {}) for name in baselines})
    champion = evaluation.get("champion")
    if champion is not None:
        slices[CHAMPION] = champion["slices"]
    return gate(evaluation["candidate"]["overall"], baselines, champion and champion["overall"], slices, gate_policy)


def decision_record(decision: GateDecision) -> dict:
    return {"accepted": decision.accepted, "metric": decision.metric, "reasons": decision.reasons,
            "table": [{"check": c.check, "against": c.reference, "candidate": c.candidate, "reference": c.reference_value,
                       "required": c.required, "passed": c.passed, "note": c.note} for c in decision.table]}
