"""The experiment statistics (vitrine.experiments): hand-computed small cases, and every test proven by
simulation — error rates over many seeded runs, checked against bounds derived from the binomial
sampling error of a rate (SE = √(p(1−p)/R)), and each shown able to fail (the naive versions do)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from vitrine.contracts.outcomes import InterleavedOutcome, UserOutcome
from vitrine.experiments import cuped, sequential, simulation, srm
from vitrine.experiments.analysis import analyse
from vitrine.experiments.estimators import (
    Moments,
    fixed_horizon_p_value,
    ratio,
    relative_difference,
    welch_df,
)
from vitrine.experiments.interleaving import analyse_interleaving, sign_test, sign_test_p_values

ALPHA = 0.05


def se(p: float, runs: int) -> float:
    """One binomial standard error of a rate p measured over `runs` independent experiments."""
    return math.sqrt(p * (1 - p) / runs)


# --- hand-computed cases ------------------------------------------------------------------------


def test_delta_method_ratio_by_hand() -> None:
    # y = clicks, x = impressions of three users. R = 6/8; x̄ = 8/3; s_yy = 1, s_xx = 4/3, s_xy = 1
    # Var(R) = (s_yy − 2R s_xy + R² s_xx) / (n x̄²) = (1 − 1.5 + 0.75) / (3 · 64/9) = 3/256
    r, var = ratio(Moments.of(np.array([1, 2, 3]), np.array([2, 2, 4])))
    assert r == pytest.approx(0.75)
    assert var == pytest.approx(3 / 256)
    # the same as the variance of the mean of the linearised values L = R + (y − R x) / x̄
    lin = 0.75 + (np.array([1, 2, 3]) - 0.75 * np.array([2, 2, 4])) / (8 / 3)
    assert var == pytest.approx(np.var(lin, ddof=1) / 3)


def test_mean_metric_and_welch_match_scipy() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.poisson(2.0, 300).astype(float), rng.poisson(2.3, 200).astype(float)
    ea, eb = ratio(Moments.of(a)), ratio(Moments.of(b))
    assert ea[0] == pytest.approx(a.mean()) and ea[1] == pytest.approx(a.var(ddof=1) / a.size)
    p = fixed_horizon_p_value(eb[0] - ea[0], ea[1] + eb[1], welch_df(eb[1], b.size, ea[1], a.size))
    assert p == pytest.approx(stats.ttest_ind(b, a, equal_var=False).pvalue)


def test_relative_lift_delta_method_by_hand() -> None:
    # (1.1/1.0 − 1) = 0.1; Var ≈ v_t/c² + t² v_c/c⁴ = 0.01 + 1.21 · 0.01
    r, var = relative_difference((1.1, 0.01), (1.0, 0.01))
    assert r == pytest.approx(0.1) and var == pytest.approx(0.0221)


def _dm_log_bf(counts: list[int], shares: list[float], k: float = srm.PRIOR_CONCENTRATION) -> float:
    """log Bayes factor computed independently: scipy's Dirichlet-multinomial pmf over the multinomial pmf."""
    n = sum(counts)
    return float(stats.dirichlet_multinomial.logpmf(counts, [k * s for s in shares], n) - stats.multinomial.logpmf(counts, n, shares))


def _dm_p_value(*strata: tuple[list[int], list[float]]) -> float:
    return min(1.0, math.exp(-sum(_dm_log_bf(c, s) for c, s in strata)))


def test_srm_by_hand() -> None:
    ok = srm.check({"a": 520, "b": 480}, {"a": 1, "b": 1})
    assert ok.chi2 == pytest.approx(1.6) and ok.chi2_p_value == pytest.approx(stats.chi2.sf(1.6, 1)) and not ok.flagged
    assert ok.p_value == pytest.approx(_dm_p_value(([520, 480], [0.5, 0.5])))
    bad = srm.check({"a": 5300, "b": 4700}, {"a": 1, "b": 1})
    assert bad.chi2 == pytest.approx(36.0) and bad.p_value < 0.001 and bad.flagged
    assert bad.p_value == pytest.approx(_dm_p_value(([5300, 4700], [0.5, 0.5])))
    # the price of being valid at every look: 52/48 at 10,000 users is χ² p < 0.001 at one look, not yet here
    assert srm.check({"a": 5200, "b": 4800}, {"a": 1, "b": 1}).chi2_p_value < 0.001
    # strata (a ramp): the Bayes factors multiply, each stratum against its own weights
    ramp = srm.check_strata([({"a": 900, "b": 100}, {"a": 90, "b": 10}), ({"a": 530, "b": 470}, {"a": 50, "b": 50})])
    assert ramp.p_value == pytest.approx(_dm_p_value(([900, 100], [0.9, 0.1]), ([530, 470], [0.5, 0.5])))
    assert ramp.expected == pytest.approx({"a": 1400.0, "b": 600.0}) and ramp.observed == {"a": 1430, "b": 570}
    # the same users judged against one 50/50 split would be a glaring mismatch
    assert srm.check({"a": 1430, "b": 570}, {"a": 1, "b": 1}).flagged and not ramp.flagged
    assert not srm.check({"a": 667, "b": 333}, {"a": 2, "b": 1}).flagged
    stray = srm.check({"a": 10, "b": 10, "c": 1}, {"a": 1, "b": 1})
    assert stray.flagged and "c" in stray.reason


def test_cuped_by_hand() -> None:
    # a: y = 2, 4, 6 with z = 1, 2, 3 (cov 2, var 1); b: y = 4, 5, 9 with z = 2, 2, 5 (cov 4.5, var 3)
    # θ pooled within = (2·2 + 2·4.5) / (2·1 + 2·3) = 13/8; z̄ = 15/6 = 2.5
    ma = Moments.of(np.array([2, 4, 6]), z=np.array([1, 2, 3]))
    mb = Moments.of(np.array([4, 5, 9]), z=np.array([2, 2, 5]))
    theta, ((ya, va), (yb, vb)) = cuped.adjust_all([ma, mb])
    assert theta == pytest.approx(1.625)
    assert ya == pytest.approx(4 - 1.625 * (2 - 2.5)) and yb == pytest.approx(6 - 1.625 * (3 - 2.5))
    # var(y − θz) in a: values 0.375, 0.75, 1.125 → 0.140625; / n
    assert va == pytest.approx(0.140625 / 3)
    assert cuped.variance_reduction(ratio(ma)[1], va) == pytest.approx(1 - 0.140625 / 4)


def test_msprt_boundary_and_confidence_sequence_agree() -> None:
    var, tau2 = 0.04, 0.1
    assert sequential.p_value(0.0, var, tau2) == 1.0
    low, high = sequential.confidence_sequence(0.3, var, tau2, ALPHA)
    # at the edge of the confidence sequence the mSPRT p-value is exactly α
    assert sequential.p_value(0.3 - low, var, tau2) == pytest.approx(ALPHA)
    assert sequential.p_value(high - 0.3, var, tau2) == pytest.approx(ALPHA)
    # and it is wider than the fixed-horizon interval (the price of looking at any time)
    assert high - 0.3 > stats.norm.ppf(0.975) * math.sqrt(var)
    # running minimum: the always-valid p-value never goes back up
    p = sequential.always_valid_p_values(np.array([0.5, 0.1, 0.6]), np.full(3, var), tau2)
    assert np.all(np.diff(p) <= 0)


def test_sign_test_by_hand() -> None:
    share, low, high, p = sign_test(15, 5)
    assert share == 0.75 and p == pytest.approx(stats.binomtest(15, 20).pvalue) and p < ALPHA
    assert low < 0.75 < high
    assert sign_test_p_values(np.array([15]), np.array([5]))[0] == pytest.approx(p)


def test_interleaving_rows_user_is_the_unit_and_teams_swapped() -> None:
    rows = [InterleavedOutcome(f"u{i}", "gru", "pop", 3, 1, 2, 0, 0) for i in range(42)]
    rows += [InterleavedOutcome(f"v{i}", "pop", "gru", 3, 1, 2, 0, 0) for i in range(9)]  # swapped: prefers pop
    rows += [InterleavedOutcome("heavy", "gru", "pop", 0, 900, 0, 400, 0)]  # one heavy user = one vote
    result = analyse_interleaving(rows, planned_votes=50)
    assert (result.users_prefer_a, result.users_prefer_b) == (42, 10)
    assert result.p_value == pytest.approx(stats.binomtest(42, 52).pvalue)
    # the always-valid p-value, by an independent formula: 1 / (beta-binomial pmf ÷ binomial pmf at ½)
    a = result.prior_a
    assert result.sequential_p == pytest.approx(stats.binom.pmf(42, 52, 0.5) / stats.betabinom.pmf(42, 52, a, a))
    assert result.sequential_p < ALPHA and result.winner == "gru"
    assert 0.5 < result.sequential_low < 42 / 52 < result.sequential_high
    # at its edges the confidence sequence is where the mixture's ratio is exactly 1/α
    for edge in (result.sequential_low, result.sequential_high):
        assert stats.betabinom.pmf(42, 52, a, a) / stats.binom.pmf(42, 52, edge) == pytest.approx(1 / ALPHA, rel=1e-6)
    # tuned for 2,000 votes, 52 votes are not yet enough for the always-valid test: no winner
    assert analyse_interleaving(rows).winner is None
    assert result.exposure_share_a < 0.5  # exposure-weighted, the heavy user dominates: why users vote


# --- proven by simulation -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aa() -> simulation.AAResult:
    return simulation.simulate_aa(experiments=1000, users_per_arm=400, first_look=100, seed=21)


def test_aa_fixed_horizon_false_positive_rate_is_alpha(aa: simulation.AAResult) -> None:
    bound = 4 * se(ALPHA, aa.experiments)
    assert abs(aa.fixed_horizon - ALPHA) <= bound, aa


def test_aa_sequential_test_peeked_at_every_user_stays_below_alpha(aa: simulation.AAResult) -> None:
    assert aa.looks >= 300
    assert aa.sequential_peeking <= ALPHA + 3 * se(ALPHA, aa.experiments), aa


def test_aa_naive_tests_fail(aa: simulation.AAResult) -> None:
    """The check can fail: the fixed-horizon test peeked at every look, and CTR with the binomial
    variance (impressions as the unit), both reject far more often than α."""
    bound = ALPHA + 4 * se(ALPHA, aa.experiments)
    assert aa.naive_peeking > bound, aa
    assert aa.binomial_naive > bound, aa


@pytest.fixture(scope="module")
def planted() -> tuple[float, float]:
    return simulation.calibrate(lift=0.10, users=40_000, seed=7)


def test_calibration_plants_ten_percent(planted: tuple[float, float]) -> None:
    sigma, lift = planted
    assert sigma > 0 and lift == pytest.approx(0.10, abs=1e-4)


def test_planted_lift_power_cuped_beats_plain_ab(planted: tuple[float, float]) -> None:
    sigma, _ = planted
    runs = 200
    plain, with_cuped = simulation.power_ab(users_per_arm=2000, experiments=runs, sigma_a=sigma, seed=22)
    assert plain > ALPHA + 4 * se(ALPHA, runs)  # the test detects the planted lift …
    assert with_cuped - plain > 3 * se(0.5, runs) / math.sqrt(2)  # … and CUPED more often
    # A/A through the same path (same ranker in both arms): CUPED keeps the false-positive rate
    aa_plain, aa_cuped = simulation.power_ab(users_per_arm=1000, experiments=400, sigma_a=sigma, sigma_b=sigma, seed=23)
    for rate in (aa_plain, aa_cuped):
        assert abs(rate - ALPHA) <= 4 * se(ALPHA, 400)


def test_interleaving_power_and_false_positive_rate(planted: tuple[float, float]) -> None:
    sigma, _ = planted
    runs = 200
    power = simulation.power_interleaving(users=600, experiments=runs, sigma_a=sigma, seed=24)
    plain, _ = simulation.power_ab(users_per_arm=300, experiments=runs, sigma_a=sigma, seed=25)
    assert power > 0.6 and power - plain > 4 * se(0.5, runs)  # same 600 users: interleaving far more sensitive
    aa = simulation.power_interleaving(users=600, experiments=400, sigma_a=sigma, sigma_b=sigma, seed=26)
    assert aa <= ALPHA + 3 * se(ALPHA, 400)


def test_srm_detects_planted_split_and_rarely_false_alarms() -> None:
    runs = 50_000
    result = simulation.simulate_srm(users=20_000, experiments=runs, planted_share=0.52, seed=27)
    assert result.detection_rate > 0.95
    assert abs(result.false_alarm_rate - 0.001) <= 4 * se(0.001, runs)
    assert 5_000 < result.users_for_80_percent < 20_000


# --- the entry point on rows ------------------------------------------------------------------------


def _rows(users: int, lift: float, share_b: float, seed: int) -> list[UserOutcome]:
    rng = np.random.default_rng(seed)
    pop = simulation.draw_users((users,), rng)
    b = rng.random(users) < share_b
    impr, clicks = simulation.ab_outcomes(pop, 0.3, rng)
    clicks = clicks + np.where(b, rng.binomial(clicks, lift), 0)  # B: CTR × (1 + lift) in expectation
    purchases = rng.binomial(clicks, 0.1)
    return [UserOutcome(f"u{i}", "b" if b[i] else "a", int(pop.exposures[i]), int(impr[i]), int(clicks[i]), 0,
                        int(purchases[i]), int(pop.pre_events[i])) for i in range(users)]


def test_analyse_names_a_large_lift_and_cuped_shrinks_the_interval() -> None:
    result = analyse(_rows(6000, 0.3, 0.5, seed=31), {"a": 1, "b": 1}, "a", covariate=True)
    ctr = next(c for c in result.comparisons if c.metric == "ctr")
    assert ctr.significant and ctr.relative.low > 0 and ctr.sequential.significant
    assert ctr.cuped is not None and ctr.cuped.variance_reduction > 0.1
    assert ctr.cuped.absolute.high - ctr.cuped.absolute.low < ctr.absolute.high - ctr.absolute.low
    assert ctr.sequential.low <= ctr.absolute.estimate <= ctr.sequential.high
    assert not result.srm.flagged
    assert "CTR" in result.table() and result.to_dict()["srm"]["flagged"] is False


def test_analyse_flags_srm_and_keeps_quiet_without_a_difference() -> None:
    result = analyse(_rows(20_000, 0.0, 0.52, seed=32), {"a": 1, "b": 1}, "a", covariate=False)
    assert result.srm.flagged
    quiet = analyse(_rows(4000, 0.0, 0.5, seed=33), {"a": 1, "b": 1}, "a", covariate=False)
    assert not quiet.srm.flagged
    # quiet: no comparison is significant, by either test
    assert not any(c.significant or c.sequential.significant for c in quiet.comparisons), quiet.table()
    assert all(c.sequential.p_value >= c.p_value for c in quiet.comparisons)  # always-valid is the more careful


def test_results_section_leaves_other_sections(tmp_path) -> None:  # noqa: ANN001
    from vitrine.commands.stats import RESULTS_HEADING, replace_section

    doc = tmp_path / "experiments.md"
    doc.write_text("# Experiments\n\n## Attribution\n\nwritten by someone else\n")
    replace_section(doc, RESULTS_HEADING, "first")
    replace_section(doc, RESULTS_HEADING, "second")
    text = doc.read_text()
    assert "written by someone else" in text and "second" in text and "first" not in text
    assert text.count(RESULTS_HEADING) == 1
