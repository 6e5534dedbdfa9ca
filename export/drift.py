"""Input and output distributions of a ranker, and the population stability index between two of them.

The export step records reference distributions on validation data (`metadata.json` → "reference");
the gateway records the same distributions on live traffic and exports PSI per feature and variant.
Both sides use the functions here, so that a bucket means the same thing in both places.

PSI = Σ (actual − expected) · ln(actual / expected) over shares per bucket. Rules of thumb: < 0.1 no
shift, 0.1–0.25 moderate, > 0.25 a shift worth acting on (retraining).
"""

from __future__ import annotations

import numpy as np

from vitrine.export.data.sequences import FIRST_ITEM, OOV, PAD

POPULARITY_BUCKETS = (0.01, 0.1, 0.5, 1.0)
"""Upper edges, as shares of the vocabulary by popularity rank: head 1 %, 1-10 %, 10-50 %, tail."""
PSI_EPSILON = 1e-4
FEATURES = ("sequence_length", "popularity_mix", "unknown_item_rate", "empty_history_rate", "top1_score")


def popularity_upper_index(vocabulary_rows: int) -> list[int]:
    """Model item id at which each popularity bucket ends (ids are ordered most popular first)."""
    vocab = vocabulary_rows - FIRST_ITEM
    return [FIRST_ITEM + int(np.ceil(share * vocab)) for share in POPULARITY_BUCKETS]


def popularity_counts(items: np.ndarray, upper_index: list[int]) -> np.ndarray:
    """How many known input items fall in each popularity bucket."""
    known = items[items >= FIRST_ITEM]
    return np.bincount(np.searchsorted(upper_index, known, side="right"), minlength=len(upper_index))[: len(upper_index)]


def history_stats(items: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Per row: history length; over all rows: unknown items and real items."""
    real = items != PAD
    return real.sum(axis=-1), int((items == OOV).sum()), int(real.sum())


def psi(expected: np.ndarray | list[float], actual: np.ndarray | list[float]) -> float:
    e = np.asarray(expected, dtype=float)
    a = np.asarray(actual, dtype=float)
    e = np.clip(e / max(e.sum(), 1e-12), PSI_EPSILON, None)
    a = np.clip(a / max(a.sum(), 1e-12), PSI_EPSILON, None)
    return float(np.sum((a - e) * np.log(a / e)))
