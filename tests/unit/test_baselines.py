"""Each baseline against a hand-made storefront whose right answers were worked out on paper.

Items A..E have ids 2..6 (the vocabulary is ordered most trained-on first: A, B, C tie at 3 steps and
keep id order, then D with 2, E with 1). Training windows (max_len 3, left-padded, as item sequences):

    [_, A, B, C]   [_, _, A, C]   [B, C, D, A]   [_, _, D, B]

Directly-followed counts: A→B 1, A→C 1, B→C 2, C→D 1, D→A 1, D→B 1. Two steps apart: A→C, B→D, C→A.
"""

import numpy as np
import pytest

from vitrine.export import baselines as bl
from vitrine.export.data.sequences import Dataset, Vocabulary
from vitrine.export.metrics import HEAD_SLICE, TAIL_SLICE, slice_masks

_ = 0
A, B, C, D, E = 2, 3, 4, 5, 6
NAMES = {A: "A", B: "B", C: "C", D: "D", E: "E"}
SEQUENCES = [[_, A, B, C], [_, _, A, C], [B, C, D, A], [_, _, D, B]]
VALIDATION = [([_, B, A], C), ([_, C, D], B), ([_, _, E], A)]


def hand_dataset() -> Dataset:
    sequences = np.array(SEQUENCES)
    inputs, targets = sequences[:, :-1], sequences[:, 1:].copy()
    targets[inputs == _] = _  # no target where there is no input (as sequences.build pads them)
    valid_inputs = np.array([h for h, _t in VALIDATION])
    return Dataset(
        vocabulary=Vocabulary(("A", "B", "C", "D", "E")),
        cutoff_ms=0,
        train_inputs=inputs,
        train_types=(inputs != _).astype(np.int64),
        train_targets=targets,
        valid_inputs=valid_inputs,
        valid_types=(valid_inputs != _).astype(np.int64),
        valid_targets=np.array([t for _h, t in VALIDATION]),
        train_item_counts=np.array([0, 0, 3, 3, 3, 2, 1]),
        max_len=3,
    )


def ranking(baseline: bl.Baseline, history: list[int]) -> str:
    """The baseline's full ranking of the catalogue for one history, as letters."""
    scores = baseline.scores(np.array([history]))[0]
    order = [int(i) for i in np.argsort(-scores, kind="stable") if i >= A]
    return "".join(NAMES[i] for i in order)


def test_popularity_ranks_by_training_count_ties_by_vocabulary_order() -> None:
    popularity = bl.Popularity(hand_dataset())
    assert ranking(popularity, [_, _, D]) == ranking(popularity, [_, _, E]) == "ABCDE"


def test_transitions_score_what_followed_the_last_item_ties_broken_by_popularity() -> None:
    transitions = bl.Transitions(hand_dataset())
    assert ranking(transitions, [_, _, B]) == "CABDE"  # B→C twice, the rest by popularity
    assert ranking(transitions, [_, B, A]) == "BCADE"  # A→B and A→C once each: B is the more popular
    assert ranking(transitions, [_, C, D]) == "ABCDE"  # D→A, D→B; only the last step counts
    assert ranking(transitions, [_, _, E]) == "ABCDE"  # E never had a successor: popularity


def test_cooccurrence_lets_recent_steps_vote_with_decay() -> None:
    dataset = hand_dataset()
    knn = bl.Cooccurrence(dataset, window=2, decay=0.5, follow_span=1)
    # [B, A]: A votes B 1, C 1; B (one step back, weight 0.5) votes C 2 × 0.5 → C 2, B 1.
    assert ranking(knn, [_, B, A]) == "CBADE"
    # [C, D]: D votes A 1, B 1; C votes D 1 × 0.5 → A 1, B 1, D 0.5.
    assert ranking(knn, [_, C, D]) == "ABDCE"
    # A step beyond the window has no vote: window 1 is the transition table.
    assert ranking(bl.Cooccurrence(dataset, window=1, decay=0.5, follow_span=1), [_, B, A]) == "BCADE"
    # Span 2: A→C two steps apart adds 0.5 → C 1.5 ahead of B 1.
    assert ranking(bl.Cooccurrence(dataset, window=1, decay=0.5, follow_span=2), [_, _, A]) == "CBADE"


def test_follow_counts_are_the_hand_counted_table() -> None:
    counts = bl.follow_counts(hand_dataset(), span=1, decay=0.5).toarray()
    expected = np.zeros((7, 7))
    for (a, b), n in {(A, B): 1, (A, C): 1, (B, C): 2, (C, D): 1, (D, A): 1, (D, B): 1}.items():
        expected[a, b] = n
    np.testing.assert_array_equal(counts, expected)


def test_evaluation_uses_the_shared_metrics_and_names_the_strongest() -> None:
    report = bl.evaluate_baselines(hand_dataset(), bl.BaselineConfig(window=2, decay=0.5, follow_span=1, metric="mrr"))
    # Target ranks (0-based) per validation row: popularity C 2, B 1, A 0; transitions C 1, B 1, A 0;
    # co-occurrence C 0, B 1, A 0 (E has no successors, so popularity answers).
    assert report.metrics["popularity"]["mrr"] == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)
    assert report.metrics["transitions"]["mrr"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    assert report.metrics["cooccurrence"]["mrr"] == pytest.approx((1 + 1 / 2 + 1) / 3)
    assert report.metrics["transitions"]["ndcg@10"] == pytest.approx((2 / np.log2(3) + 1) / 3)
    assert report.strongest == "cooccurrence" and report.as_record()["metric"] == "mrr"


def test_slices_bucket_history_length_and_head_vs_tail_targets() -> None:
    masks = slice_masks(hand_dataset())
    assert masks["history 1"].tolist() == [False, False, True]
    assert masks["history 2-4"].tolist() == [True, True, False]
    # 5 items: the head is the top 20 %, i.e. A alone.
    assert masks[HEAD_SLICE].tolist() == [False, False, True] and masks[TAIL_SLICE].tolist() == [True, True, False]


def test_bad_baseline_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="decay"):
        bl.BaselineConfig(decay=0)
    with pytest.raises(ValueError, match="unknown metric"):
        bl.BaselineConfig(metric="auc")


def test_every_run_record_carries_the_baselines_and_their_slices(tmp_path) -> None:
    import json

    from vitrine.export.data import sequences, synthetic
    from vitrine.export.train import TrainConfig, train

    table = synthetic.generate(synthetic.preset("tiny"))
    dataset = sequences.build(table, max_len=8)
    run = train(TrainConfig(architecture="gru4rec", epochs=1, max_len=8, dim=8), dataset,
                {"fingerprint": table.fingerprint()}, tmp_path, progress=False, baselines=bl.BaselineConfig(metric="mrr"))
    record = json.loads((run / "run.json").read_text())
    names = {"popularity", "transitions", "cooccurrence"}
    assert set(record["metrics"]) == {"model", *names} and set(record["baselines"]["metrics"]) == names
    assert record["baselines"]["metric"] == "mrr"
    assert record["baselines"]["strongest"] == max(names, key=lambda n: record["metrics"][n]["mrr"])
    assert set(record["slice_metrics"]) == {"model", *names}
    assert sum(s["rows"] for n, s in record["slice_metrics"]["model"].items() if n.startswith("history")) == len(dataset.valid_targets)
