"""Do two top-k answers name the same items? The one rule for parity (torch vs ONNX), the unit tests and
Triton vs onnxruntime in-process.

Two rankers that compute the same scores may still order equal-scored items differently, so a slot
may hold another item than the reference only when the two items' *reference* scores tie (within the
tolerance). Comparing the two answers' scores slot by slot cannot tell: a server that returns the
right scores with the wrong item ids agrees with the reference on every score. What decides is the
reference score of the item that was returned:

- with the reference model's full scores (every item, exclusions applied), it is looked up;
- with only the reference top-k, an item of the reference top-k has its reference score there; any
  other item scored at most the reference's k-th score (or it would be in the top k), so it can only
  tie with slots whose reference score ties with the k-th score.

Each row's ids must also be distinct (a top-k never names an item twice).
"""

from __future__ import annotations

import numpy as np


def unexplained_id_differences(
    expected_ids: np.ndarray,
    expected_scores: np.ndarray,
    got_ids: np.ndarray,
    tolerance: float,
    full_scores: np.ndarray | None = None,
) -> np.ndarray:
    """Mask (batch, k) of the slots where `got_ids` names another item than `expected_ids` without a tie.

    `expected_ids`/`expected_scores` are the reference top-k (descending scores); `full_scores`
    (batch, n_items), when given, holds the reference's score of every item.
    """
    expected_ids = np.asarray(expected_ids)
    expected_scores = np.asarray(expected_scores, dtype=float)
    got_ids = np.asarray(got_ids)
    if got_ids.shape != expected_ids.shape or expected_scores.shape != expected_ids.shape:
        raise ValueError(f"shapes differ: expected ids {expected_ids.shape}, scores {expected_scores.shape}, got {got_ids.shape}")
    bad = np.zeros(got_ids.shape, dtype=bool)
    for row, col in zip(*np.nonzero(got_ids != expected_ids), strict=True):
        item = got_ids[row, col]
        wanted = expected_scores[row, col]
        if full_scores is not None:
            bad[row, col] = abs(float(full_scores[row, item]) - float(full_scores[row, expected_ids[row, col]])) > tolerance
            continue
        where = np.flatnonzero(expected_ids[row] == item)
        if len(where):
            bad[row, col] = abs(expected_scores[row, where[0]] - wanted) > tolerance
        else:  # outside the reference top-k: scored at most the k-th score, so a tie only at the cut-off
            bad[row, col] = wanted - expected_scores[row, -1] > tolerance
    for row in range(got_ids.shape[0]):
        _, first = np.unique(got_ids[row], return_index=True)
        repeated = np.ones(got_ids.shape[1], dtype=bool)
        repeated[first] = False
        bad[row] |= repeated
    return bad
