"""Models, training and evaluation on small generated data (torch on CPU, no services)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vitrine.export import models
from vitrine.export.data import sequences, synthetic
from vitrine.export.baselines import evaluate_popularity
from vitrine.export.train import TrainConfig, load_run, ranking_metrics, train


@pytest.fixture(scope="module")
def small() -> tuple[sequences.Dataset, dict]:
    table = synthetic.generate(synthetic.preset("small"))
    return sequences.build(table, max_len=12), {"fingerprint": table.fingerprint(), "source": "synthetic:small"}


@pytest.fixture(scope="module")
def runs(small, tmp_path_factory) -> dict[str, Path]:
    dataset, info = small
    out = tmp_path_factory.mktemp("runs")
    return {
        arch: train(TrainConfig(architecture=arch, epochs=8, max_len=12, dim=32), dataset, info, out, progress=False)
        for arch in models.ARCHITECTURES
    }


@pytest.mark.parametrize("architecture", models.ARCHITECTURES)
def test_both_models_beat_popularity_on_recall_at_10_by_a_clear_margin(runs, architecture: str) -> None:
    record = json.loads((runs[architecture] / "run.json").read_text())
    ours, base = record["metrics"]["model"], record["metrics"]["popularity"]
    assert ours["recall@10"] > 1.5 * base["recall@10"], (ours, base)
    assert ours["ndcg@10"] > base["ndcg@10"] and ours["mrr"] > base["mrr"]


@pytest.fixture(scope="module")
def tuned_runs(tmp_path_factory) -> dict[str, Path]:
    """Both models with the shipped training defaults on the small storefront (seed 7): missions and repeat
    purchases give the history something a transition table cannot see."""
    table = synthetic.generate(synthetic.preset("small"))
    dataset = sequences.build(table, max_len=TrainConfig.max_len)
    info = {"fingerprint": table.fingerprint(), "source": "synthetic:small"}
    out = tmp_path_factory.mktemp("tuned")
    return {arch: train(TrainConfig(architecture=arch, threads=1), dataset, info, out, progress=False) for arch in models.ARCHITECTURES}


@pytest.mark.parametrize("architecture", models.ARCHITECTURES)
def test_trained_with_the_defaults_both_models_beat_the_strongest_baseline(tuned_runs, architecture: str) -> None:
    """Recall@10 ≥ 1.025 × the strongest counter's (~2.5 standard errors of the paired difference on these
    ~2,000 validation targets; seeded and deterministic, so no flake; measured +4.8 % (GRU4Rec) and +3.7 % (SASRec) with the
    14.4 defaults, +4.8 % and +4.3 % with the earlier ones), and NDCG@10 not
    more than 2 % below it (the gain must not come from ranking the right item lower)."""
    record = json.loads((tuned_runs[architecture] / "run.json").read_text())
    strongest = record["baselines"]["strongest"]
    ours, best = record["metrics"]["model"], record["metrics"][strongest]
    assert strongest != "popularity"
    assert ours["recall@10"] >= 1.025 * best["recall@10"], (strongest, ours, best)
    assert ours["ndcg@10"] >= 0.98 * best["ndcg@10"], (strongest, ours, best)


def test_the_run_record_holds_what_reproduces_the_run(runs) -> None:
    record = json.loads((runs["gru4rec"] / "run.json").read_text())
    assert record["parameters"]["seed"] == 7 and record["parameters"]["architecture"] == "gru4rec"
    assert len(record["data"]["fingerprint"]) == 64 and record["data"]["validation_targets"] > 0
    assert set(record["metrics"]["model"]) == {"recall@10", "recall@20", "ndcg@10", "mrr"}
    assert record["code_version"] and record["duration_s"] > 0 and record["environment"]["torch"]
    model, _, vocabulary = load_run(runs["gru4rec"])
    assert model.n_items == len(vocabulary) + sequences.FIRST_ITEM


def test_training_is_deterministic(small, tmp_path: Path) -> None:
    dataset, info = small
    config = TrainConfig(architecture="sasrec", epochs=1, max_len=12, dim=16)
    first, second = (load_run(train(config, dataset, info, tmp_path / str(i), progress=False))[0] for i in range(2))
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("architecture", models.ARCHITECTURES)
def test_padding_is_masked_the_same_history_gives_the_same_state(architecture: str) -> None:
    torch.manual_seed(0)
    model = models.build(architecture, n_items=40, max_len=16, dim=16).eval()
    items, types = torch.tensor([[5, 9, 7]]), torch.tensor([[1, 2, 1]])

    def last_state(length: int) -> torch.Tensor:
        pad = torch.zeros(1, length - 3, dtype=torch.long)
        return model.encode(torch.cat([pad, items], 1), torch.cat([pad, types], 1))[:, -1]

    torch.testing.assert_close(last_state(16), last_state(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(last_state(16), last_state(8), atol=1e-5, rtol=0)


def test_serving_ranker_never_returns_padding_unknown_or_excluded_items() -> None:
    torch.manual_seed(0)
    ranker = models.ServingRanker(models.build("gru4rec", n_items=30, max_len=5, dim=8).eval(), k=10)
    items = torch.tensor([[0, 0, 4, 5, 6]])
    exclude = torch.tensor([[4, 5, 6, 7, 0]])
    ids, scores, _ = ranker(items, torch.ones_like(items), exclude)
    assert ids.shape == scores.shape == (1, 10)
    assert not set(ids[0].tolist()) & {0, 1, 4, 5, 6, 7}
    assert torch.all(scores[0, :-1] >= scores[0, 1:])


def test_ranking_metrics_on_a_hand_made_case() -> None:
    scores = np.array([[0, 0, 5.0, 4.0, 3.0], [0, 0, 1.0, 2.0, 3.0]])
    metrics = ranking_metrics(scores, np.array([3, 2]))  # ranks 1 and 2 (0-based)
    assert metrics["recall@10"] == 1.0
    assert metrics["mrr"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert metrics["ndcg@10"] == pytest.approx((1 / np.log2(3) + 1 / np.log2(4)) / 2)
    # An unknown target (id 1) can never be hit.
    assert ranking_metrics(scores[:1], np.array([1]))["recall@20"] == 0.0


def test_popularity_baseline_ranks_by_training_counts(small) -> None:
    dataset, _ = small
    metrics = evaluate_popularity(dataset)
    assert 0 < metrics["recall@10"] < metrics["recall@20"] < 1


def test_bad_training_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(architecture="gru4rec", learning_rate=3.0)
    with pytest.raises(ValueError, match="unknown architecture"):
        models.build("bert4rec", 10, 5, 8)  # type: ignore[arg-type]
