"""The gateway's drift monitor: PSI over the last `window` requests of the version serving now."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from vitrine.export.data.sequences import FIRST_ITEM, OOV, PAD
from vitrine.export.drift import history_stats, popularity_counts, popularity_upper_index, psi
from vitrine.services.gateway.drift import DriftMonitor
from vitrine.services.gateway.metrics import DRIFT_PSI, GatewayMetrics
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


# Hand-computed cases: PSI = Σ (a − e) · ln(a / e) over shares (counts / total); a share below 1e-4 counts
# as 1e-4 (the shares are not renormalised after that). Worked out with the logarithms written down.


def test_psi_of_hand_computed_distributions() -> None:
    # e = .5 .3 .2, a = .3 .3 .4: (−.2)·ln .6 + 0 + .2·ln 2 = (−.2)(−.5108256) + .2(.6931472) = .1021651 + .1386294
    assert psi([50, 30, 20], [30, 30, 40]) == pytest.approx(0.2407946, abs=1e-6)
    # e = .5 .5, a = 1 0 → 1 and 1e-4: .5·ln 2 + (1e-4 − .5)·ln(2e-4) = .3465736 + (−.4999)(.6931472 − 9.2103404)
    assert psi([1, 1], [10, 0]) == pytest.approx(4.6043185, abs=1e-6)
    assert psi([2, 4], [1, 2]) == pytest.approx(0.0, abs=1e-12)  # the same shares on another scale


def test_popularity_buckets_and_counts_by_hand() -> None:
    # 100 items from id 2: head 1 % = id 2 (ends before 3), 1–10 % = ids 3..11, 10–50 % = 12..51, tail = 52..101.
    assert popularity_upper_index(VOCAB + FIRST_ITEM) == [3, 12, 52, 102]
    # 7 items (ids 2..8): ceil(.07) = 1, ceil(.7) = 1, ceil(3.5) = 4, 7 → the 1–10 % bucket is empty.
    assert popularity_upper_index(7 + FIRST_ITEM) == [3, 3, 6, 9]
    items = np.array([[PAD, OOV, 2, 3, 11, 12, 51, 52, 101], [PAD, PAD, PAD, PAD, PAD, PAD, 2, 2, 60]])
    assert popularity_counts(items, [3, 12, 52, 102]).tolist() == [3, 2, 2, 3]  # PAD and OOV are not counted
    assert popularity_counts(np.array([2, 3, 5, 6, 8]), [3, 3, 6, 9]).tolist() == [1, 0, 2, 2]
    lengths, unknown, real = history_stats(items)
    assert lengths.tolist() == [8, 3] and (unknown, real) == (1, 11)


def _hand_model() -> ServedModel:
    reference = {
        "sequence_length": {"counts": [5, 10, 20, 65], "edges": [0, 1, 3, 6, MAX_LEN + 1]},  # lengths 0 | 1-2 | 3-5 | 6-8
        "popularity_mix": {"shares": [0.3, 0.3, 0.2, 0.2], "bucket_upper_index": [3, 12, 52, 102]},
        "unknown_item_rate": 0.02, "empty_history_rate": 0.05,
        "top1_score": {"counts": [10, 40, 40, 10], "edges": [-10.0, 0.0, 5.0, 10.0, 30.0]},
    }
    items = tuple(f"i{i}" for i in range(VOCAB))
    return ServedModel("m", "1", MAX_LEN, 10, items, FIRST_ITEM, {x: i + FIRST_ITEM for i, x in enumerate(items)}, reference)


def _padded(*items: int) -> np.ndarray:
    return np.array([PAD] * (MAX_LEN - len(items)) + list(items), dtype=np.int64)


def test_monitor_psi_of_a_hand_computed_window() -> None:
    """Ten observations whose shares are worked out below; every feature's PSI is computed by hand."""
    registry = CollectorRegistry()
    monitor = DriftMonitor(GatewayMetrics(registry), window=10, interval_s=60, min_observations=10)
    model = _hand_model()
    histories = [_padded()] * 2 + [_padded(OOV, 2)] * 4 + [_padded(OOV, 3, 3, 12, 12, 12, 52, 52)] * 4
    top1 = [-1.0, 1.0, 1.0, 1.0, 1.0, 6.0, 6.0, 6.0, 20.0, 20.0]
    for items, score in zip(histories, top1, strict=True):
        monitor.observe("a", model, items, score)
    want = {
        # lengths 0 0 | 2 ×4 | — | 8 ×4 → a = .2 .4 (1e-4) .4 against e = .05 .1 .2 .65:
        # .15·ln 4 + .3·ln 4 + (1e-4 − .2)·ln(5e-4) + (−.25)·ln(.4/.65)
        # = .2079442 + .4158883 + (−.1999)(−7.6009025) + (−.25)(−.4855078) = .2079442 + .4158883 + 1.5194204 + .1213770
        "sequence_length": 2.2646298,
        # known items: head 4 (the 2s), 1–10 % 8 (the 3s), 10–50 % 12 (the 12s), tail 8 (the 52s) → a = .125 .25 .375 .25:
        # (−.175)·ln(.125/.3) + (−.05)·ln(.25/.3) + .175·ln(.375/.2) + .05·ln(.25/.2)
        # = (−.175)(−.8754687) + (−.05)(−.1823216) + .175(.6286087) + .05(.2231436) = .1532070 + .0091161 + .1100065 + .0111572
        "popularity_mix": 0.2834868,
        # 8 unknown of 40 real items → a = .2 .8, e = .02 .98: .18·ln 10 + (−.18)·ln(.8/.98) = .4144653 + .18(.2029409)
        "unknown_item_rate": 0.4509947,
        # 2 of 10 histories empty → a = .2 .8, e = .05 .95: .15·ln 4 + (−.15)·ln(.8/.95) = .2079442 + .15(.1718503)
        "empty_history_rate": 0.2337217,
        # scores per bin (−10,0) [0,5) [5,10) [10,30]: 1 4 3 2 → a = .1 .4 .3 .2, e = .1 .4 .4 .1:
        # 0 + 0 + (−.1)·ln .75 + .1·ln 2 = .0287682 + .0693147
        "top1_score": 0.0980829,
    }
    got = monitor.compute()
    assert set(got) == {(feature, "a") for feature in want}
    for feature, value in want.items():
        assert got[(feature, "a")] == pytest.approx(value, abs=1e-6), feature
        assert registry.get_sample_value(DRIFT_PSI, {"feature": feature, "variant": "a"}) == pytest.approx(value, abs=1e-6), feature
