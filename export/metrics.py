"""Offline ranking metrics, overall and per slice, shared by the models, the baselines and the gate.

One implementation for everything that is compared: a model and a baseline scored by different
code but measured by the same `ranking_metrics` on the same validation rows, so a difference in the
table is a difference in ranking, not in bookkeeping.

Slices are the ways a candidate can win on average and still hurt a group of shoppers or items:
- history length (steps before the target): cold-ish shoppers with 1 step vs. long histories, where
  sequence models should earn their keep;
- the target item's popularity: the head (top `HEAD_SHARE` of the vocabulary by training count) vs.
  the long tail (the rest, and targets unknown at training time, which no ranker can hit);
- new shoppers (no step before the cutoff) vs. returning ones;
- the target item's category, when the dataset carries one per target (the pipeline sets it from a
  pluggable item → category function, `export/pipeline/slices.py`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from vitrine.export.data.sequences import FIRST_ITEM, PAD, Dataset

METRIC_NAMES = ("recall@10", "recall@20", "ndcg@10", "mrr")
HISTORY_BUCKETS: tuple[tuple[str, int, int], ...] = (
    ("history 1", 1, 1),
    ("history 2-4", 2, 4),
    ("history 5-9", 5, 9),
    ("history 10+", 10, 1 << 30),
)
"""(name, fewest steps, most steps) of the history-length slices; histories are cut at max_len."""
HEAD_SHARE = 0.2
"""Share of the vocabulary (most trained-on first) whose items count as head targets."""
HEAD_SLICE, TAIL_SLICE = "head items", "long-tail items"
NEW_SLICE, RETURNING_SLICE = "new shoppers", "returning shoppers"
"""A new shopper had no step before the cutoff (their whole history lies in the held-out period)."""
CATEGORY_PREFIX = "category "
"""Per-category slices are named "category <name>" (only when the dataset carries target categories)."""
EVAL_BATCH = 1024
"""Validation rows scored at once: bounds memory at EVAL_BATCH × catalogue scores."""


def target_ranks(scores: np.ndarray | torch.Tensor, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target among all items (a tie counts in the target's favour);
    infinity for padding or unknown targets, which no ranker can hit."""
    scores = torch.as_tensor(scores)
    target = torch.as_tensor(targets)
    target_scores = scores.gather(1, target.unsqueeze(1))
    rank = (scores > target_scores).sum(dim=1).double()  # 0 = first place
    rank = torch.where(target < FIRST_ITEM, torch.full_like(rank, float("inf")), rank)  # never a hit
    return rank.numpy()


def metrics_from_ranks(rank: np.ndarray) -> dict[str, float]:
    """Recall@10/20, NDCG@10 and MRR from 0-based target ranks (the one formula for every ranker)."""
    return {
        "recall@10": float(np.mean(rank < 10)),
        "recall@20": float(np.mean(rank < 20)),
        "ndcg@10": float(np.mean(np.where(rank < 10, 1 / np.log2(np.minimum(rank, 10) + 2), 0.0))),
        "mrr": float(np.mean(1 / (rank + 1))),
    }


def ranking_metrics(scores: np.ndarray | torch.Tensor, targets: np.ndarray) -> dict[str, float]:
    """Recall@10/20, NDCG@10 and MRR over the full catalogue. A tie counts in the target's favour."""
    return metrics_from_ranks(target_ranks(scores, targets))


def slice_masks(dataset: Dataset) -> dict[str, np.ndarray]:
    """Boolean row masks over the validation targets, one per slice (history buckets, head/tail)."""
    lengths = (dataset.valid_inputs != PAD).sum(axis=1)
    masks = {name: (lengths >= low) & (lengths <= high) for name, low, high in HISTORY_BUCKETS}
    n_items = dataset.vocabulary.size - FIRST_ITEM
    # The vocabulary is ordered most trained-on first, so the head is a prefix of the item ids.
    head_end = FIRST_ITEM + math.ceil(HEAD_SHARE * n_items)
    head = (dataset.valid_targets >= FIRST_ITEM) & (dataset.valid_targets < head_end)
    masks[HEAD_SLICE], masks[TAIL_SLICE] = head, ~head
    if dataset.valid_returning is not None:
        masks[NEW_SLICE], masks[RETURNING_SLICE] = ~dataset.valid_returning, dataset.valid_returning.copy()
    if dataset.valid_target_category is not None:
        for category in sorted(set(dataset.valid_target_category.tolist()) - {""}):
            masks[CATEGORY_PREFIX + category] = dataset.valid_target_category == category
    return masks


class SlicedMetrics:
    """Target ranks collected over batches of validation rows, then metrics overall and per slice.

    Batches keep memory bounded (a full score matrix of the default preset is ~270 MB); only one rank
    per row is kept, so every slice is a mask over the same ranks.
    """

    def __init__(self, dataset: Dataset) -> None:
        self._targets = dataset.valid_targets
        self._masks = slice_masks(dataset)
        self._ranks = np.full(len(self._targets), np.nan)

    def add(self, start: int, scores: np.ndarray | torch.Tensor) -> None:
        """Scores of validation rows [start, start + len(scores))."""
        self._ranks[start : start + len(scores)] = target_ranks(scores, self._targets[start : start + len(scores)])

    def overall(self) -> dict[str, float]:
        return metrics_from_ranks(self._complete())

    def slices(self) -> dict[str, dict[str, float]]:
        """Per slice: its metrics and `rows` (how many validation targets it holds); empty slices are left out."""
        ranks = self._complete()
        return {name: {**metrics_from_ranks(ranks[mask]), "rows": int(mask.sum())}
                for name, mask in self._masks.items() if mask.any()}

    def _complete(self) -> np.ndarray:
        if np.isnan(self._ranks).any():
            raise ValueError("not every validation row was scored")
        return self._ranks


def batches(n: int, size: int = EVAL_BATCH) -> Iterator[tuple[int, int]]:
    """[start, stop) of consecutive batches over n rows."""
    for start in range(0, n, size):
        yield start, min(start + size, n)
