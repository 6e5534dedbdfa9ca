"""The sampled softmax used for training (export/losses.py): exact in the limit, unbiased normaliser, seeded."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitrine.export.data.sequences import FIRST_ITEM
from vitrine.export.losses import draw_negatives, full_softmax_loss, proposal, sampled_softmax_loss
from vitrine.export.train import TrainConfig

V, D = 50, 8


def _case(seed: int = 0, rows: int = 6):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, D, generator=g)
    table = torch.randn(V, D, generator=g) * 0.7
    targets = torch.randint(FIRST_ITEM, V, (rows,), generator=g)
    return hidden, table, targets


def _full_softmax(hidden, table, targets, reduction="mean"):
    logits = hidden @ table.T
    logits[:, :FIRST_ITEM] = -float("inf")  # padding and unknown are never candidates
    return F.cross_entropy(logits, targets, reduction=reduction)


def test_with_every_item_once_and_a_uniform_proposal_it_is_the_full_softmax() -> None:
    hidden, table, targets = _case()
    q = proposal(np.ones(V), alpha=0.0)
    every_item = torch.arange(FIRST_ITEM, V)
    sampled = sampled_softmax_loss(hidden, targets, table, every_item, q)
    assert torch.allclose(sampled, _full_softmax(hidden, table, targets), atol=1e-5), sampled


def test_the_proposal_never_draws_padding_or_the_unknown_item_and_follows_popularity() -> None:
    counts = np.arange(V, dtype=np.int64) + 1
    uniform, popular = proposal(counts, 0.0), proposal(counts, 1.0)
    assert uniform[:FIRST_ITEM].sum() == 0 and popular[:FIRST_ITEM].sum() == 0
    assert torch.allclose(uniform[FIRST_ITEM:], torch.full((V - FIRST_ITEM,), 1 / (V - FIRST_ITEM)))
    assert popular[-1] > popular[FIRST_ITEM] and abs(float(popular.sum()) - 1) < 1e-6
    drawn = draw_negatives(popular, 5000, torch.Generator().manual_seed(1))
    assert int(drawn.min()) >= FIRST_ITEM


def test_logq_correction_makes_the_normaliser_unbiased_under_a_popularity_proposal() -> None:
    """exp(loss + s_y) - exp(s_y) estimates sum over the other items of exp(s_i): its mean over draws
    must match the exact sum. Without the correction, or with its sign flipped, it is far off."""
    hidden, table, targets = _case(seed=3, rows=4)
    counts = (1000 / (np.arange(V) + 1.0) ** 1.2).astype(np.int64) + 1  # Zipf: a strongly skewed proposal
    # Scores that follow popularity, as trained models' do: uncorrected sampling over-counts them.
    table = table + 0.5 * torch.from_numpy(np.log(counts)).float().unsqueeze(1) * hidden.mean(0) / hidden.mean(0).norm()
    q = proposal(counts, alpha=1.0)
    scores = hidden @ table.T
    s_y = scores.gather(1, targets.unsqueeze(1)).squeeze(1)
    exact = torch.stack([scores[r, FIRST_ITEM:][torch.arange(FIRST_ITEM, V) != targets[r]].exp().sum() for r in range(len(targets))])
    g = torch.Generator().manual_seed(0)
    estimates = torch.stack([
        (sampled_softmax_loss(hidden, targets, table, draw_negatives(q, 32, g), q, reduction="none") + s_y).exp() - s_y.exp()
        for _ in range(3000)
    ])
    relative = (estimates.mean(0) / exact - 1).abs()
    assert float(relative.max()) < 0.1, relative


def test_negatives_and_loss_are_deterministic_by_seed() -> None:
    hidden, table, targets = _case()
    q = proposal(np.arange(V) + 1, alpha=0.5)
    a, b, c = (draw_negatives(q, 64, torch.Generator().manual_seed(s)) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(sampled_softmax_loss(hidden, targets, table, a, q), sampled_softmax_loss(hidden, targets, table, b, q))


def test_a_negative_equal_to_the_target_is_masked_not_counted_against_it() -> None:
    hidden, table, targets = _case(rows=1)
    q = proposal(np.ones(V), alpha=0.0)
    only_the_target = targets.repeat(8)
    assert float(sampled_softmax_loss(hidden, targets, table, only_the_target, q)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("bad", [{"loss": "hinge"}, {"negatives": 0}, {"negatives": 100_001}, {"sampling_alpha": 1.5}])
def test_the_config_rejects_out_of_bounds_loss_settings(bad: dict) -> None:
    with pytest.raises(ValueError):
        TrainConfig(architecture="gru4rec", **bad)


@pytest.mark.parametrize("architecture", ["gru4rec", "sasrec"])
def test_the_full_loss_on_real_positions_equals_cross_entropy_over_the_models_logits(architecture: str) -> None:
    from vitrine.export import models

    torch.manual_seed(0)
    model = models.build(architecture, n_items=V, max_len=6, dim=8).eval()
    items = torch.tensor([[0, 0, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    types = (items > 0).long()
    targets = torch.tensor([[0, 0, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13]])
    hidden = model.encode(items, types)
    reference = torch.nn.CrossEntropyLoss(ignore_index=0)(model.logits(hidden).reshape(-1, V), targets.reshape(-1))
    real = targets != 0
    assert torch.allclose(full_softmax_loss(hidden[real], targets[real], model.embed.items.weight), reference, atol=1e-6)
