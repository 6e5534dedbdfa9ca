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


# --- capture mode: the baseline is the serving version's own first requests -----------------------------------------


def _captured(baseline: int, window: int, min_observations: int) -> DriftMonitor:
    return DriftMonitor(GatewayMetrics(CollectorRegistry()), window=window, interval_s=60, min_observations=min_observations,
                        reference="capture", baseline_observations=baseline)


def _served_history(rng: np.random.Generator, unknown_share: float = 0.02, shortest: int = 3) -> np.ndarray:
    """A history as the gateway sends it to a model: never empty, no shorter than `shortest` steps (shorter ones get the
    transitions answer), Zipf-like item popularity, a share of unknown items."""
    length = int(rng.integers(shortest, MAX_LEN + 1))
    body = np.minimum(FIRST_ITEM + rng.zipf(1.3, size=length) - 1, FIRST_ITEM + VOCAB - 1)
    body[rng.random(length) < unknown_share] = OOV
    return np.concatenate([np.full(MAX_LEN - length, PAD), body]).astype(np.int64)


def _reference_by_hand(observations: list[tuple[np.ndarray, float | None]]) -> dict:
    """The captured reference recomputed in plain Python: lengths, item counts and score deciles."""
    lengths = [int(np.sum(items != PAD)) for items, _ in observations]
    real = sum(lengths)
    unknown = sum(int(np.sum(items == OOV)) for items, _ in observations)
    upper = popularity_upper_index(VOCAB + FIRST_ITEM)
    mix = [0] * len(upper)
    for items, _ in observations:
        for item in items.tolist():
            if item >= FIRST_ITEM:
                mix[next(b for b, end in enumerate(upper) if item < end)] += 1
    scores = sorted(s for _, s in observations if s is not None)
    inner = sorted(set(np.quantile(scores, [q / 10 for q in range(1, 10)]).tolist()))
    edges = [-3.4028234663852886e38, *inner, 3.4028234663852886e38]
    return {"lengths": [lengths.count(n) for n in range(MAX_LEN + 1)], "mix": mix, "unknown": unknown / real, "empty": 0.0,
            "edges": edges, "scores": np.histogram(scores, bins=edges)[0].tolist()}


def test_capture_reports_nothing_until_the_baseline_is_complete_then_compares_only_later_requests() -> None:
    monitor = _captured(baseline=40, window=100, min_observations=10)
    model = _model("1")
    rng = np.random.default_rng(11)
    seen = [(_served_history(rng), float(rng.normal(5, 2))) for _ in range(39)]
    for items, top1 in seen:
        monitor.observe("a", model, items, top1)
    assert monitor.compute() == {} and monitor.references() == {("m", "1"): None}
    extra = (_served_history(rng), float(rng.normal(5, 2)))
    monitor.observe("a", model, *extra)
    seen.append(extra)
    assert monitor.compute() == {}  # captured now, but no request after the baseline yet
    later = [(_served_history(rng, unknown_share=0.3), None if n % 9 == 0 else float(rng.normal(8, 2))) for n in range(30)]
    for items, top1 in later:
        monitor.observe("a", model, items, top1)
    ref = monitor.references()[("m", "1")]
    want_ref = _reference_by_hand(seen)
    assert ref["source"] == "serving" and ref["observations"] == 40
    assert ref["sequence_length"]["counts"] == want_ref["lengths"]
    assert ref["popularity_mix"]["shares"] == pytest.approx(np.array(want_ref["mix"]) / sum(want_ref["mix"]))
    assert ref["unknown_item_rate"] == pytest.approx(want_ref["unknown"]) and ref["empty_history_rate"] == 0.0
    assert ref["top1_score"]["edges"] == pytest.approx(want_ref["edges"])
    assert ref["top1_score"]["counts"] == want_ref["scores"]
    # The 30 later requests only — the 40 captured ones are still in the window, and must not dilute the shift.
    got = monitor.compute()
    want = _expected(model, later)
    lengths = [int(np.sum(items != PAD)) for items, _ in later]
    want["sequence_length"] = psi(want_ref["lengths"], [lengths.count(n) for n in range(MAX_LEN + 1)])
    unknown, real = sum(int(np.sum(items == OOV)) for items, _ in later), sum(lengths)
    want["unknown_item_rate"] = psi([want_ref["unknown"], 1 - want_ref["unknown"]], [unknown, real - unknown])
    want["popularity_mix"] = psi(want_ref["mix"], np.sum([popularity_counts(i, popularity_upper_index(VOCAB + FIRST_ITEM)) for i, _ in later], axis=0))
    want["empty_history_rate"] = psi([0.0, 1.0], [0.0, 1.0])
    want["top1_score"] = psi(want_ref["scores"], np.histogram([s for _, s in later if s is not None], bins=want_ref["edges"])[0])
    assert set(got) == {(f, "a") for f in want}
    for feature, value in want.items():
        assert got[(feature, "a")] == pytest.approx(value), feature


def test_capture_ignores_the_metadata_reference_and_serves_versions_without_one() -> None:
    monitor = _captured(baseline=20, window=50, min_observations=10)
    bare = ServedModel("m", "3", MAX_LEN, 10, _model("3").item_ids, FIRST_ITEM, _model("3").index, None)
    rng = np.random.default_rng(2)
    for _ in range(40):
        monitor.observe("a", bare, _served_history(rng), float(rng.normal(5, 2)))
    assert {f for f, _ in monitor.compute()} == {"sequence_length", "popularity_mix", "unknown_item_rate", "empty_history_rate", "top1_score"}


def test_a_new_version_captures_its_own_baseline() -> None:
    monitor = _captured(baseline=300, window=2000, min_observations=200)
    old, new = _model("1"), _model("2")
    rng = np.random.default_rng(3)
    for _ in range(600):
        monitor.observe("a", old, _served_history(rng), float(rng.normal(5, 2)))
    assert monitor.compute()
    for _ in range(299):  # the new version answers now: PSI waits for its own baseline, never uses the old one's
        monitor.observe("a", new, _served_history(rng, unknown_share=0.5), float(rng.normal(20, 2)))
    assert monitor.compute() == {}
    for _ in range(301):
        monitor.observe("a", new, _served_history(rng, unknown_share=0.5), float(rng.normal(20, 2)))
    got = monitor.compute()
    assert len(got) == 5 and max(got.values()) < 0.25, got  # the same (shifted) traffic as its own baseline: no alarm
    assert monitor.references()[("m", "2")]["unknown_item_rate"] > 0.3


def test_steady_traffic_reads_below_0_1_and_a_shift_crosses_0_25_with_the_default_sizes() -> None:
    """With the settings' defaults (baseline 2,000, PSI over ≥ 1,000 later requests, window 5,000), requests drawn from
    one distribution read PSI < 0.1 on every feature; more unknown items and other scores cross the alert's 0.25."""
    from vitrine.settings import GatewaySettings

    cfg = GatewaySettings()
    assert cfg.drift_reference == "capture"
    monitor = _captured(cfg.drift_baseline_observations, cfg.drift_window, cfg.drift_min_observations)
    model = _model("1")
    rng = np.random.default_rng(17)
    for _ in range(cfg.drift_baseline_observations + cfg.drift_min_observations):
        monitor.observe("a", model, _served_history(rng), float(rng.gamma(4, 2)))
    steady = monitor.compute()
    assert len(steady) == 5 and max(steady.values()) < 0.1, steady
    for _ in range(cfg.drift_window):
        monitor.observe("a", model, _served_history(rng, unknown_share=0.3), float(rng.gamma(4, 2)) + 4)
    shifted = monitor.compute()
    assert shifted[("unknown_item_rate", "a")] > 0.25 and shifted[("top1_score", "a")] > 0.25, shifted


def test_forget_keeps_captured_references_of_versions_still_served() -> None:
    monitor = _captured(baseline=20, window=50, min_observations=10)
    one, two = _model("1"), _model("2")
    rng = np.random.default_rng(4)
    for _ in range(40):
        monitor.observe("a", one, _served_history(rng), 1.0)
        monitor.observe("b", two, _served_history(rng), 2.0)
    monitor.compute()
    monitor.forget({"b"})  # version 1 leaves with variant a; version 2 is renumbered
    assert set(monitor.references()) == {("m", "2")} and monitor.references()[("m", "2")] is not None
    assert {v for _, v in monitor.compute()} == {"b"}


def test_capture_needs_a_baseline_size() -> None:
    with pytest.raises(ValueError, match="baseline_observations"):
        DriftMonitor(GatewayMetrics(CollectorRegistry()), window=10, interval_s=1, min_observations=1, reference="capture")


def test_settings_refuse_a_minimum_the_window_cannot_hold() -> None:
    from pydantic import ValidationError

    from vitrine.settings import GatewaySettings

    with pytest.raises(ValidationError, match="never be computed"):
        GatewaySettings(drift_window=500, drift_min_observations=1000)


class _FakeRedis:
    """The three calls the baseline store makes, on a dict (unit tests never start Redis)."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.ttl: dict[str, int] = {}

    async def get(self, key: str) -> str | None:
        return self.data.get(key)

    async def set(self, key: str, value: str, nx: bool = False, ex: int | None = None) -> bool:
        if nx and key in self.data:
            return False
        self.data[key], self.ttl[key] = value, ex or 0
        return True

    async def expire(self, key: str, seconds: int) -> bool:
        self.ttl[key] = seconds
        return key in self.data


def _fingerprinted(version: str, fingerprint: str) -> ServedModel:
    base = _model(version)
    return ServedModel("m", version, MAX_LEN, 10, base.item_ids, FIRST_ITEM, base.index, None, fingerprint=fingerprint)


@pytest.mark.timeout(10)
async def test_a_stored_baseline_is_shared_by_gateways_and_survives_a_restart() -> None:
    from vitrine.services.gateway.baselines import BaselineStore

    redis = _FakeRedis()
    store = BaselineStore(redis, "ns", size=30, ttl_s=3600, timeout_s=1)  # type: ignore[arg-type]
    first = _captured(baseline=30, window=100, min_observations=10)
    first.store = store
    rng = np.random.default_rng(8)
    served = _fingerprinted("1", "abc")  # the gateway's catalog holds one object per version
    for _ in range(30):
        first.observe("a", served, _served_history(rng), float(rng.normal(5, 2)))
    await first.sync_baselines()
    assert list(redis.data) == ["ns:drift:baseline:m:1:abc:30"] and redis.ttl["ns:drift:baseline:m:1:abc:30"] == 3600
    stored = first.references()[("m", "1")]
    # A gateway started later (or this one restarted) while the traffic has shifted: it adopts the stored baseline
    # at its first sync instead of capturing the shifted traffic as normal, and the shift shows.
    second = _captured(baseline=30, window=100, min_observations=10)
    second.store = store
    model = _fingerprinted("1", "abc")
    second.observe("a", model, _served_history(rng, unknown_share=0.5), 9.0)
    await second.sync_baselines()
    assert second.references()[("m", "1")] == stored
    for _ in range(20):
        second.observe("a", model, _served_history(rng, unknown_share=0.5), 9.0)
    got = second.compute()
    assert got[("unknown_item_rate", "a")] > 0.25
    # Another export under the same name and number (another metadata.json) never inherits it.
    third = _captured(baseline=30, window=100, min_observations=10)
    third.store = store
    third.observe("a", _fingerprinted("1", "def"), _served_history(rng), 1.0)
    await third.sync_baselines()
    assert third.references()[("m", "1")] is None


@pytest.mark.timeout(10)
async def test_when_two_gateways_complete_a_capture_the_first_stored_baseline_wins() -> None:
    from vitrine.services.gateway.baselines import BaselineStore

    store = BaselineStore(_FakeRedis(), "ns", size=20, ttl_s=60, timeout_s=1)  # type: ignore[arg-type]
    monitors = [_captured(baseline=20, window=50, min_observations=10) for _ in range(2)]
    rng = np.random.default_rng(9)
    for monitor, shift in zip(monitors, (0.0, 0.4), strict=True):
        monitor.store = store
        served = _fingerprinted("1", "abc")
        for _ in range(20):
            monitor.observe("a", served, _served_history(rng, unknown_share=shift), 1.0)
        monitor.compute()  # each completes its own capture locally
    for monitor in monitors:
        await monitor.sync_baselines()
    assert monitors[1].references()[("m", "1")] == monitors[0].references()[("m", "1")]
    assert monitors[1].references()[("m", "1")]["unknown_item_rate"] < 0.2
