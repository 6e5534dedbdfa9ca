"""Training losses for next-item models: the full-catalogue softmax and a sampled softmax.

The full softmax scores every catalogue item at every real position of a batch: with ~9k items and
128 windows of 20 steps that is a [2,560 × 9k] logit matrix per batch, forward and backward, and it
dominates training time on large catalogues (docs/benchmarks.md, Training).

The sampled softmax scores each position's target and `K` negatives shared by the whole batch, drawn
with replacement from a proposal `q` (item popularity ** alpha; alpha 0 is uniform). Each negative's
logit is corrected by `- log(K q(i))` (the "logQ correction"), which makes `sum_k exp(s_k - log(K q_k))`
an unbiased estimate of the catalogue's normaliser `sum_i exp(s_i)`: popular items, drawn more often,
count less each time. A negative that happens to be the row's own target is masked ("accidental hit").
With a uniform proposal and every item drawn exactly once (K = catalogue), the correction is zero and
the loss is exactly the full softmax (a unit test checks this).

`full_softmax_loss` is the exact full-catalogue loss, computed on real positions only.

Only training uses them: evaluation and the exported graph always score the full catalogue.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from vitrine.export.data.sequences import FIRST_ITEM

Loss = Literal["full", "sampled"]
LOSSES: tuple[Loss, ...] = ("full", "sampled")


def full_softmax_loss(hidden: torch.Tensor, targets: torch.Tensor, item_table: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every real item (ids >= FIRST_ITEM), for real positions only.

    The same loss as cross-entropy over `SequenceRecommender.logits` with padding ignored (the blocked
    ids' logits are -1e9, weight exp(-1e9) = 0), without scoring padded positions and without the
    [B, L, V] masked copy of the logits. hidden [N, D], targets [N] item ids (no padding).
    """
    return F.cross_entropy(hidden @ item_table[FIRST_ITEM:].T, targets - FIRST_ITEM)


def proposal(item_counts: np.ndarray | torch.Tensor, alpha: float) -> torch.Tensor:
    """Sampling probabilities over the item table: count ** alpha for real items, 0 for padding and unknown."""
    counts = torch.as_tensor(item_counts, dtype=torch.float64).clamp(min=1.0)
    q = counts**alpha
    q[:FIRST_ITEM] = 0.0
    return (q / q.sum()).to(torch.float32)


def draw_negatives(q: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """K item ids drawn with replacement from `q` (deterministic for a seeded generator)."""
    return torch.multinomial(q, k, replacement=True, generator=generator)


def sampled_softmax_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    item_table: torch.Tensor,
    negatives: torch.Tensor,
    q: torch.Tensor,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """Cross-entropy of each row's target against the shared negatives, with the logQ correction.

    hidden [N, D] (real positions only), targets [N] item ids, item_table [V, D], negatives [K] ids,
    q [V] the proposal the negatives were drawn from.
    """
    k = negatives.shape[0]
    positive = (hidden * item_table[targets]).sum(dim=-1, keepdim=True)  # [N, 1]
    negative = hidden @ item_table[negatives].T - torch.log(q[negatives] * k)  # [N, K]
    negative = negative.masked_fill(negatives.unsqueeze(0) == targets.unsqueeze(1), -math.inf)
    logits = torch.cat([positive, negative], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long, device=hidden.device), reduction=reduction)
