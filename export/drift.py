"""Input and output distributions of a ranker, and the population stability index between two of them.

A reference is a dict built by `build_reference` — the one format, whoever builds it: the export records
one on validation data (`metadata.json` → "reference", source "validation"); the gateway captures one
from the first observations of a version on live traffic (source "serving", `gateway.drift_reference =
"capture"`, docs/drift.md) and compares its recent traffic with it, exporting PSI per feature and variant.
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
SCORE_BINS = 10
"""Top-1 score histogram of a reference: deciles of the reference's own scores, the outer two open-ended."""
OPEN_EDGE = float(np.finfo(np.float32).max)
"""Stands for ±infinity in the score edges, kept finite so that metadata.json stays standard JSON."""
SOURCE_VALIDATION, SOURCE_SERVING = "validation", "serving"
"""Where a reference's observations came from: the training run's validation rows (export), or the version's
own first requests in serving (the gateway's baseline capture)."""


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


def score_histogram(scores: np.ndarray) -> dict[str, list[float]]:
    """Deciles of `scores` as bin edges (outer bins open-ended, tied edges merged) and the counts in them."""
    if len(scores) == 0:
        edges = np.array([-OPEN_EDGE, OPEN_EDGE])
    else:
        edges = np.unique(np.quantile(scores, np.linspace(0, 1, SCORE_BINS + 1)))
        edges = np.concatenate([[-OPEN_EDGE], edges[1:-1], [OPEN_EDGE]]) if len(edges) > 2 else np.array([-OPEN_EDGE, OPEN_EDGE])
    return {"edges": [float(e) for e in edges], "counts": np.histogram(scores, bins=edges)[0].tolist()}


def build_reference(lengths: np.ndarray, unknown: int, real: int, popularity: np.ndarray, top1: np.ndarray, max_len: int,
                    upper_index: list[int], source: str) -> dict[str, object]:
    """A reference from observations: per request its history length and top-1 score; over all requests the unknown
    and real history items and the known items per popularity bucket (`popularity_counts` summed)."""
    return {
        "source": source,
        "observations": int(len(lengths)),
        "sequence_length": {"edges": (np.arange(max_len + 2) - 0.5).tolist(),
                            "counts": np.histogram(lengths, bins=np.arange(max_len + 2) - 0.5)[0].tolist()},
        "popularity_mix": {
            "bucket_upper_share": list(POPULARITY_BUCKETS),
            "bucket_upper_index": list(upper_index),
            "shares": (popularity / max(1, int(popularity.sum()))).tolist(),
        },
        "unknown_item_rate": unknown / real if real else 0.0,
        "empty_history_rate": float(np.mean(lengths == 0)) if len(lengths) else 0.0,
        "top1_score": score_histogram(top1),
    }
