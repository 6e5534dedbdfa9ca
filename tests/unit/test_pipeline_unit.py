"""The pipeline's parts without services: each data check, the gate against a champion (slices included), the
lock, the recorder, and the category function."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from tests.pipeline_data import future, recent, write_archive, write_file_without
from vitrine.export.data import synthetic
from vitrine.export.gate import CANDIDATE, CHAMPION, GatePolicy, gate
from vitrine.export.pipeline import validate as v
from vitrine.export.pipeline.champion import topk_ranks
from vitrine.export.pipeline.lock import PipelineBusy, PipelineLock, is_locked
from vitrine.export.pipeline.record import FileRunRecorder, check_run_id, new_run_id
from vitrine.export.pipeline.slices import synthetic_categories
from vitrine.settings import PipelineSettings

SETTINGS = PipelineSettings(min_events=100, volume_min_ratio=0.5, volume_max_ratio=2.0, max_unknown_item_share=0.2,
                            min_events_per_type=5, max_empty_hour_share=0.1, max_future_skew_s=60)


def m(recall: float, **others: float) -> dict[str, float]:
    return {"recall@10": recall, "recall@20": others.get("recall20", recall + 0.05), "ndcg@10": others.get("ndcg", recall / 2),
            "mrr": others.get("mrr", recall / 2)}


# --- data checks -------------------------------------------------------------------------------------------

def test_volume_needs_the_minimum_and_a_ratio_to_the_previous_window_within_bounds() -> None:
    assert [c.passed for c in v.check_volume(99, 100, SETTINGS)] == [False, True]
    assert [c.passed for c in v.check_volume(500, 1000, SETTINGS)] == [True, True]
    low, = [c for c in v.check_volume(400, 1000, SETTINGS) if "previous" in c.check]
    assert low.passed is False and "0.40×" in low.value
    assert v.check_volume(2500, 1000, SETTINGS)[1].passed is False
    assert v.check_volume(500, 0, SETTINGS)[1].passed is None  # no previous window: shown, not judged


def test_each_event_type_needs_its_minimum_count() -> None:
    types = np.array([0] * 50 + [1] * 10 + [2] * 5 + [3] * 4, dtype=np.int8)
    checks = {c.check: c.passed for c in v.check_types(types, SETTINGS)}
    assert checks == {"events of type view": True, "events of type click": True, "events of type add_to_cart": True,
                      "events of type purchase": False}


def test_the_share_of_items_unknown_to_the_champion_is_bounded_and_not_judged_without_a_champion() -> None:
    items = np.array(["a", "b", "c", "d", "e"])
    assert v.check_unknown_items(items, {"a", "b", "c", "d"}, SETTINGS).passed is True  # 20 %
    failed = v.check_unknown_items(items, {"a", "b", "c"}, SETTINGS)
    assert failed.passed is False and failed.value == "40.0%"
    assert v.check_unknown_items(items, None, SETTINGS).passed is None


def test_time_coverage_counts_empty_hours_between_the_first_and_last_event() -> None:
    hour = 3_600_000
    full = np.arange(20) * hour + 5
    assert v.check_coverage(full, SETTINGS).passed is True
    gap = np.concatenate([full[:8], full[11:]])  # 3 of 20 hours empty: 15 % > 10 %
    check = v.check_coverage(gap, SETTINGS)
    assert check.passed is False and check.value.startswith("3 of 20 hours empty")
    assert v.check_coverage(np.array([], dtype=np.int64), SETTINGS).passed is False


def test_future_timestamps_fail_the_run() -> None:
    assert v.check_future(0, SETTINGS).passed is True
    assert v.check_future(3, SETTINGS).passed is False


def test_a_window_and_its_previous_window_have_the_same_length() -> None:
    window = v.Window.trailing(date(2026, 3, 10), 7)
    assert (window.since, window.until) == (date(2026, 3, 4), date(2026, 3, 10))
    assert (window.previous().since, window.previous().until) == (date(2026, 2, 25), date(2026, 3, 3))


@pytest.fixture(scope="module")
def tiny() -> object:
    return recent("tiny")


def _window(table) -> v.Window:  # noqa: ANN001
    from datetime import UTC, datetime

    return v.Window.trailing(datetime.fromtimestamp(int(table.ts_ms.max()) / 1000, tz=UTC).date(), 30)


def test_a_clean_archive_passes_every_check(tmp_path: Path, tiny) -> None:  # noqa: ANN001
    write_archive(tmp_path, tiny)
    loose = SETTINGS.model_copy(update={"max_empty_hour_share": 1.0, "min_events_per_type": 1})
    result = v.validate(tmp_path, "events", _window(tiny), loose, None)
    assert result.passed, v.format_checks(result.checks)
    assert result.table is not None and len(result.table) == len(tiny)


def test_a_file_without_a_column_stops_the_run_naming_the_file(tmp_path: Path, tiny) -> None:  # noqa: ANN001
    write_archive(tmp_path, tiny)
    bad = write_file_without(tmp_path, tiny.take(np.arange(10)), "item_id")
    result = v.validate(tmp_path, "events", _window(tiny), SETTINGS, None)
    assert not result.passed and result.table is None
    schema = result.checks[0]
    assert schema.check == "schema" and schema.passed is False
    assert bad.name in schema.value and "missing item_id" in schema.value
    assert "FAIL" in v.format_checks(result.checks)


def test_future_timestamps_anywhere_in_the_archive_stop_the_run(tmp_path: Path, tiny) -> None:  # noqa: ANN001
    following = write_archive(tmp_path, tiny)
    write_archive(tmp_path, future(tiny.take(np.arange(len(tiny) - 5, len(tiny))), hours=48), first_offset=following)
    loose = SETTINGS.model_copy(update={"max_empty_hour_share": 1.0, "min_events_per_type": 1})
    result = v.validate(tmp_path, "events", _window(tiny), loose, None)
    failed = {c.check: c.value for c in result.failures()}
    assert list(failed) == ["future timestamps"] and failed["future timestamps"].startswith("5 events")


# --- the gate against a champion -------------------------------------------------------------------------------

BASELINES = {"popularity": m(0.10), "transitions": m(0.40)}
POLICY = GatePolicy(margin=0.02, champion_tolerance=0.01, slice_tolerance=0.05, min_slice_rows=50, champion_margin=0.02)


def test_the_candidate_must_beat_the_champion_by_the_margin() -> None:
    assert gate(m(0.52), BASELINES, champion=m(0.50), policy=POLICY).accepted  # 0.52 ≥ 0.50 × 1.02
    decision = gate(m(0.505), BASELINES, champion=m(0.50), policy=POLICY)
    assert not decision.accepted and "champion" in decision.reasons[0] and "margin 2%" in decision.reasons[0]


def test_the_other_metrics_may_fall_below_the_champion_only_within_the_tolerance() -> None:
    decision = gate(m(0.55, mrr=0.20), BASELINES, champion=m(0.50, mrr=0.25), policy=POLICY)
    assert not decision.accepted
    assert any(r.startswith("overall mrr: mrr 0.2000") for r in decision.reasons), decision.reasons


def test_losing_a_category_slice_to_the_champion_rejects_an_otherwise_better_candidate() -> None:
    slices = {CANDIDATE: {"category c01": {**m(0.30), "rows": 400}, "category c02": {**m(0.70), "rows": 400}},
              CHAMPION: {"category c01": {**m(0.45), "rows": 400}, "category c02": {**m(0.55), "rows": 400}}}
    decision = gate(m(0.55), BASELINES, champion=m(0.50), slices=slices, policy=POLICY)
    assert not decision.accepted
    assert len(decision.reasons) == 1 and "slice 'category c01'" in decision.reasons[0] and "champion" in decision.reasons[0]
    slices[CANDIDATE]["category c01"] = {**m(0.44), "rows": 400}  # within 5 % of 0.45
    assert gate(m(0.55), BASELINES, champion=m(0.50), slices=slices, policy=POLICY).accepted


def test_without_a_champion_margin_the_export_gate_keeps_its_tolerance_rule() -> None:
    policy = GatePolicy(champion_tolerance=0.01)
    assert gate(m(0.496), BASELINES, champion=m(0.50), policy=policy).accepted


def test_topk_ranks_find_the_target_and_miss_blocked_or_unknown_ones() -> None:
    ids = np.array([[5, 7, 9], [5, 7, 9], [1, 7, 9], [5, 7, 9]])
    scores = np.array([[3.0, 2.0, 1.0], [3.0, -1e9, 1.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0]], dtype=np.float32)
    ranks = topk_ranks(ids, scores, np.array([7, 7, 1, 4]))
    assert ranks[0] == 1 and np.isinf(ranks[1:]).all()


# --- lock, record, categories -------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from vitrine.export.pipeline.lock import PipelineLock
lock = PipelineLock(Path(sys.argv[1]), "holder")
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_acquire_fails_while_the_holder_lives_and_succeeds_once_it_was_killed(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert is_locked(tmp_path)
        with pytest.raises(PipelineBusy) as busy:
            PipelineLock(tmp_path, "second").acquire()
        assert busy.value.holder["pid"] == holder.pid and busy.value.holder["run_id"] == "holder"
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a crash: no release, no cleanup
        holder.wait()
    assert not is_locked(tmp_path)
    with PipelineLock(tmp_path, "second"):
        assert is_locked(tmp_path)
    assert not is_locked(tmp_path)


def test_the_recorder_keeps_each_steps_status_timings_and_numbers(tmp_path: Path) -> None:
    recorder = FileRunRecorder(tmp_path)
    run_id = new_run_id()
    recorder.start(run_id, "manual", {"window": {"since": "2026-01-01", "until": "2026-01-07"}})
    recorder.step(run_id, "validate", "running", attempt_numbers=1)
    recorder.step(run_id, "validate", "failed", reason="x")
    recorder.step(run_id, "validate", "running")  # a resumed step starts clean
    started = recorder.load(run_id)["steps"]["validate"]["started_at"]
    assert "attempt_numbers" not in recorder.load(run_id)["steps"]["validate"]
    time.sleep(0.01)
    recorder.step(run_id, "validate", "running", checks=[1, 2])  # numbers added while running keep the start time
    assert recorder.load(run_id)["steps"]["validate"]["started_at"] == started
    recorder.step(run_id, "validate", "succeeded", events=123)
    step = recorder.load(run_id)["steps"]["validate"]
    assert step["status"] == "succeeded" and step["events"] == 123 and step["checks"] == [1, 2] and step["duration_s"] > 0
    recorder.finish(run_id, "rejected", "gate")
    assert [r["status"] for r in recorder.runs()] == ["rejected"]
    assert (tmp_path / "runs" / run_id / "record.json").is_file()
    with pytest.raises(ValueError):
        check_run_id("../etc")


def test_synthetic_item_ids_map_to_the_storefronts_categories_and_others_are_unknown() -> None:
    truth = synthetic.storefront(synthetic.preset("tiny")).category
    category_of = synthetic_categories("tiny", 7)
    out = category_of(np.array(["i0", "i5", "i79", "i80", "sku-1", "i"]))
    assert out.tolist() == [f"c{truth[0]:02d}", f"c{truth[5]:02d}", f"c{truth[79]:02d}", "", "", ""]


def test_the_candidates_rows_reach_the_champion_in_the_champions_own_ids_and_history_length() -> None:
    from pathlib import Path as _Path

    from vitrine.export.data.sequences import Dataset, Vocabulary
    from vitrine.export.pipeline.champion import Champion, _reencode

    # Candidate ids: 0 pad, 1 unknown, a=2, b=3, c=4. Champion ids: c=2, a=3 (it never saw b).
    dataset = Dataset(vocabulary=Vocabulary(("a", "b", "c")), cutoff_ms=0, train_inputs=np.zeros((1, 3), dtype=np.int64),
                      train_types=np.zeros((1, 3), dtype=np.int64), train_targets=np.zeros((1, 3), dtype=np.int64),
                      valid_inputs=np.array([[0, 2, 3], [4, 1, 2]]), valid_types=np.array([[0, 1, 2], [1, 1, 4]]),
                      valid_targets=np.array([4, 3]), train_item_counts=np.zeros(5, dtype=np.int64), max_len=3,
                      valid_returning=np.array([True, False]), valid_target_ids=np.array(["c", "b"]))
    short = Champion("m", 1, _Path("."), ("c", "a"), max_len=2, max_k=10, record={})
    items, types, targets = _reencode(dataset, short)
    assert items.tolist() == [[3, 1], [1, 3]] and types.tolist() == [[1, 2], [1, 4]] and targets.tolist() == [2, 1]
    longer = Champion("m", 1, _Path("."), ("c", "a"), max_len=4, max_k=10, record={})
    items, _, _ = _reencode(dataset, longer)
    assert items.tolist() == [[0, 0, 3, 1], [0, 2, 1, 3]]
