"""Step 3, evaluate: the candidate and the live champion on the same newest held-out rows, overall and by slice.

Both are measured from ranks within the top `k` the champion's graph returns (k ≥ 20 leaves Recall@10/20 and
NDCG@10 exact; MRR counts a target below k as a miss for both), so the two columns differ only in ranking.
Slices: history length, head vs. long tail, new vs. returning shoppers, each target category (`metrics.slice_masks`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vitrine.export.data.sequences import Dataset
from vitrine.export.metrics import EVAL_BATCH, batches, metrics_from_ranks, slice_masks, target_ranks
from vitrine.export.pipeline.champion import Champion, champion_ranks
from vitrine.export.train import load_run


def candidate_ranks(run_dir: Path, dataset: Dataset) -> np.ndarray:
    """Full-catalogue ranks of the candidate's validation targets (its own trained module, in-process)."""
    model, _, _ = load_run(run_dir)
    ranks = np.empty(len(dataset.valid_targets))
    with torch.no_grad():
        for start, stop in batches(len(ranks), EVAL_BATCH):
            hidden = model.encode(torch.from_numpy(dataset.valid_inputs[start:stop]), torch.from_numpy(dataset.valid_types[start:stop]))
            ranks[start:stop] = target_ranks(model.logits(hidden[:, -1]), dataset.valid_targets[start:stop])
    return ranks


def summarise(ranks: np.ndarray, dataset: Dataset) -> dict:
    """Overall metrics and per-slice metrics (with `rows`) of one ranker's ranks."""
    return {"overall": metrics_from_ranks(ranks),
            "slices": {name: {**metrics_from_ranks(ranks[mask]), "rows": int(mask.sum())}
                       for name, mask in slice_masks(dataset).items() if mask.any()}}


def evaluate(run_dir: Path, dataset: Dataset, champion: Champion | None) -> dict:
    """{"candidate": summary, "champion": summary | None, "k": the champion's top-k (None: full-catalogue ranks)}."""
    ours = candidate_ranks(run_dir, dataset)
    if champion is None:
        return {"candidate": summarise(ours, dataset), "champion": None, "k": None}
    k = champion.max_k
    ours = np.where(ours < k, ours, np.inf)
    return {"candidate": summarise(ours, dataset), "champion": summarise(champion_ranks(dataset, champion), dataset), "k": k}
