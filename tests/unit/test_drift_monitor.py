"""The gateway's drift monitor: PSI over the last `window` requests of the version serving now."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from vitrine.export.data.sequences import FIRST_ITEM, OOV, PAD
from vitrine.export.drift import history_stats, popularity_counts, popularity_upper_index, psi
from vitrine.services.gateway.drift import DriftMonitor
from vitrine.services.gateway.metrics import GatewayMetrics
from vitrine.services.gateway.ranking import ServedModel

MAX_LEN, VOCAB = 8, 100


def _model(version: str) -> ServedModel:
    upper = popularity_upper_index(VOCAB + FIRST_ITEM)
    reference = {
        "sequence_length": {"counts": [5, 10, 20, 65], "edges": [0, 1, 3, 6, MAX_LEN + 1]},
        "popularity_mix": {"shares": [0.3, 0.3, 0.2, 0.2], "bucket_upper_index": upper},
        "unknown_item_rate": 0.02, "empty_history_rate": 0.05,
        "top1_score": {"counts": [10, 40, 40, 10], "edges": [-10.0, 0.0, 5.0, 10.0, 30.0]},
    }
    items = tuple(f"i{i}" for i in range(VOCAB))
    return ServedModel("m", version, MAX_LEN, 10, items, FIRST_ITEM, {x: i + FIRST_ITEM for i, x in enumerate(items)}, reference)


def _history(rng: np.random.Generator) -> np.ndarray:
    length = int(rng.integers(0, MAX_LEN + 1))
    body = rng.integers(FIRST_ITEM, FIRST_ITEM + VOCAB, size=length)
    body[rng.random(length) < 0.1] = OOV
    return np.concatenate([np.full(MAX_LEN - length, PAD), body]).astype(np.int64)


def _expected(model: ServedModel, observations: list[tuple[np.ndarray, float | None]]) -> dict[str, float]:
    ref = model.reference
    stats = [history_stats(items) for items, _ in observations]
    lengths = np.array([int(s[0]) for s in stats])
    unknown, real = sum(s[1] for s in stats), sum(s[2] for s in stats)
    empty = float(np.mean(lengths == 0))
    popularity = np.sum([popularity_counts(items, ref["popularity_mix"]["bucket_upper_index"]) for items, _ in observations], axis=0)
    scores = [s for _, s in observations if s is not None]
    return {
        "sequence_length": psi(ref["sequence_length"]["counts"], np.histogram(lengths, bins=ref["sequence_length"]["edges"])[0]),
        "popularity_mix": psi(ref["popularity_mix"]["shares"], popularity),
        "unknown_item_rate": psi([0.02, 0.98], [unknown, max(real - unknown, 0)]),
        "empty_history_rate": psi([0.05, 0.95], [empty, 1 - empty]),
        "top1_score": psi(ref["top1_score"]["counts"], np.histogram(scores, bins=ref["top1_score"]["edges"])[0]),
    }


def test_psi_covers_exactly_the_last_window_of_the_serving_version() -> None:
    monitor = DriftMonitor(GatewayMetrics(CollectorRegistry()), window=50, interval_s=60, min_observations=10)
    old, new = _model("1"), _model("2")
    rng = np.random.default_rng(5)
    seen: list[tuple[ServedModel, np.ndarray, float | None]] = []
    for n in range(130):  # wraps the ring twice; the version changes on the way
        model = old if n < 100 else new
        items, top1 = _history(rng), (None if n % 7 == 0 else float(rng.normal(3, 4)))
        monitor.observe("a", model, items, top1)
        seen.append((model, items, top1))
    last = [(items, top1) for model, items, top1 in seen[-50:] if model is new]
    assert len(last) == 30
    got = monitor.compute()
    want = _expected(new, last)
    for feature, value in want.items():
        assert got[(feature, "a")] == pytest.approx(value), feature


def test_too_few_observations_of_the_serving_version_report_nothing() -> None:
    monitor = DriftMonitor(GatewayMetrics(CollectorRegistry()), window=50, interval_s=60, min_observations=10)
    rng = np.random.default_rng(1)
    old = _model("1")
    for _ in range(40):
        monitor.observe("a", old, _history(rng), 1.0)
    assert monitor.compute()  # enough of version 1 ...
    new = _model("2")
    for _ in range(5):
        monitor.observe("a", new, _history(rng), 1.0)
    assert monitor.compute() == {}  # ... but version 2 serves now, with too few observations to judge
