"""The promotion gate on made-up metrics: what it accepts, what it rejects, and that it says why."""

import json
from pathlib import Path

import pytest

from vitrine.export.gate import CANDIDATE, CHAMPION, GateError, GatePolicy, champion_record, gate, gate_run


def m(recall: float) -> dict[str, float]:
    return {"recall@10": recall, "recall@20": recall + 0.05, "ndcg@10": recall / 2, "mrr": recall / 2}


BASELINES = {"popularity": m(0.12), "transitions": m(0.63), "cooccurrence": m(0.59)}


def test_a_candidate_that_beats_popularity_but_not_transitions_is_rejected() -> None:
    decision = gate(m(0.62), BASELINES)
    assert not decision.accepted
    assert len(decision.reasons) == 1 and "transitions" in decision.reasons[0]
    assert [c.passed for c in decision.table] == [False]


def test_a_tie_with_the_strongest_baseline_is_not_enough() -> None:
    assert not gate(m(0.63), BASELINES, policy=GatePolicy(margin=0.02)).accepted
    assert gate(m(0.63), BASELINES, policy=GatePolicy(margin=0.0)).accepted


def test_a_candidate_that_beats_every_baseline_by_the_margin_is_accepted() -> None:
    decision = gate(m(0.70), BASELINES)
    assert decision.accepted and decision.reasons == []
    assert "transitions (strongest baseline)" in decision.format()


def test_the_champion_may_not_be_beaten_beyond_the_tolerance() -> None:
    policy = GatePolicy(champion_tolerance=0.01)
    assert not gate(m(0.70), BASELINES, champion=m(0.72), policy=policy).accepted  # 0.70 < 0.72 × 0.99
    assert gate(m(0.715), BASELINES, champion=m(0.72), policy=policy).accepted


def test_a_lost_slice_is_reported_by_name() -> None:
    slices = {
        CANDIDATE: {"history 10+": {**m(0.75), "rows": 900}, "long-tail items": {**m(0.20), "rows": 300}},
        "transitions": {"history 10+": {**m(0.64), "rows": 900}, "long-tail items": {**m(0.37), "rows": 300}},
    }
    decision = gate(m(0.70), BASELINES, slices=slices)
    assert not decision.accepted
    assert len(decision.reasons) == 1 and "slice 'long-tail items'" in decision.reasons[0]
    assert "slice 'long-tail items'" in decision.format() and "FAIL" in decision.format()


def test_small_slices_are_shown_but_not_judged() -> None:
    slices = {CANDIDATE: {"history 1": {**m(0.1), "rows": 3}}, "transitions": {"history 1": {**m(0.5), "rows": 3}}}
    decision = gate(m(0.70), BASELINES, slices=slices, policy=GatePolicy(min_slice_rows=50))
    assert decision.accepted and decision.table[-1].passed is None


def test_the_champion_slices_count_too() -> None:
    slices = {CANDIDATE: {"head items": {**m(0.70), "rows": 500}}, CHAMPION: {"head items": {**m(0.80), "rows": 500}}}
    decision = gate(m(0.70), BASELINES, champion=m(0.70), slices=slices)
    assert not decision.accepted and "slice 'head items'" in decision.reasons[0] and "champion" in decision.reasons[0]


def record(recall: float, fingerprint: str = "f" * 64) -> dict:
    return {
        "data": {"fingerprint": fingerprint, "cutoff_ms": 5},
        "metrics": {"model": m(recall), **BASELINES},
        "baselines": {"strongest": "transitions", "metric": "recall@10", "metrics": BASELINES},
        "slice_metrics": {"model": {"head items": {**m(recall), "rows": 500}},
                          "transitions": {"head items": {**m(0.63), "rows": 500}}},
    }


def test_a_run_record_is_gated_and_an_old_record_is_refused() -> None:
    assert gate_run(record(0.70)).accepted and not gate_run(record(0.62)).accepted
    with pytest.raises(GateError, match="without baseline"):
        gate_run({"metrics": {"model": m(0.7), "popularity": m(0.1)}})


def test_the_champion_counts_only_when_measured_on_the_same_data(tmp_path: Path) -> None:
    version = tmp_path / "gru4rec" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(b"")
    (version / "metadata.json").write_text(json.dumps({"run": record(0.75)}))
    same, _ = champion_record(tmp_path / "gru4rec", record(0.70))
    assert same is not None and not gate_run(record(0.70), same).accepted
    other, why = champion_record(tmp_path / "gru4rec", record(0.70, fingerprint="0" * 64))
    assert other is None and "not comparable" in why
    assert champion_record(tmp_path / "sasrec", record(0.70)) == (None, "no served version")


def test_vitrine_export_refuses_a_rejected_run_and_writes_nothing(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vitrine.cli import app

    run = tmp_path / "runs" / "gru4rec-20260101T000000-ffffffff"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({**record(0.62), "model": "gru4rec"}))
    repository = tmp_path / "repository"
    result = CliRunner().invoke(app, ["export", str(run), "--no-load"], env={"VITRINE_TRITON__MODEL_REPOSITORY": str(repository)})
    assert result.exit_code == 1, result.output
    assert "gate REJECTED" in result.output and "transitions (strongest baseline)" in result.output
    assert "not exported (rejected by the gate)" in result.output
    assert not repository.exists()


# --- thresholds from the typed settings (issue 14 item 2) ----------------------------------------------
def test_the_policy_defaults_are_the_settings_defaults_and_the_metric_names_agree() -> None:
    import typing

    from vitrine.export.metrics import METRIC_NAMES
    from vitrine.settings import GateSettings, Metric

    assert GatePolicy.from_settings(GateSettings()) == GatePolicy()
    assert GatePolicy() == GatePolicy(metric="recall@10", margin=0.02, champion_tolerance=0.01, slice_tolerance=0.05, min_slice_rows=50)
    assert typing.get_args(Metric) == METRIC_NAMES


def test_gate_settings_come_from_the_environment_and_out_of_bound_values_name_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from vitrine.settings import Settings

    monkeypatch.setenv("VITRINE_GATE__MARGIN", "0.05")
    monkeypatch.setenv("VITRINE_GATE__METRIC", "ndcg@10")
    policy = GatePolicy.from_settings(Settings().gate)
    assert (policy.margin, policy.metric) == (0.05, "ndcg@10")
    for field, value in (("MARGIN", "1.5"), ("SLICE_TOLERANCE", "-0.1"), ("METRIC", "auc")):
        monkeypatch.setenv(f"VITRINE_GATE__{field}", value)
        with pytest.raises(ValidationError) as refused:
            Settings()
        assert field.lower() in str(refused.value)
        monkeypatch.delenv(f"VITRINE_GATE__{field}")
