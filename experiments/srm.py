"""Sample-ratio mismatch: are the users split the way the experiment was configured?

A χ² goodness-of-fit test (Pearson; `scipy.stats.chisquare`) of the observed users per variant
against the configured weights. A mismatch means assignment or logging is broken (a variant that
crashes for some users, bots filtered on one side, a redirect that loses users…), and then no lift
is trustworthy — Fabijan et al., "Diagnosing Sample Ratio Mismatch in Online Controlled
Experiments", KDD 2019.

**The check is sequential.** The monitor looks every few seconds for as long as the experiment runs, and a
χ² test at p < 0.001 re-read that often raises a false alarm in a few per cent of healthy experiments (the
bench measures it). The flag therefore comes from an always-valid test: the Dirichlet-multinomial Bayes
factor of Lindon & Malek, "Anytime-Valid Inference for Multinomial Count Data", NeurIPS 2022 (the test
Optimizely uses for SRM). For users n_i per variant, configured shares θ_i and a prior Dirichlet(K θ),

    BF_n = Γ(K) / Γ(K + n) · Π_i Γ(K θ_i + n_i) / Γ(K θ_i)  /  Π_i θ_i^n_i,

a martingale with mean 1 under H0 whatever the order users arrive in, so ``p = min(1, 1/BF)`` may be read at
every look and the flag (p < 0.001, sticky: `vitrine.experiments.decision` keeps the running minimum) is
raised by a healthy split with probability at most 0.001 *over the whole experiment*. Revisions with other
weights (a ramp) are strata: users who entered under each revision are tested against that revision's
weights, and the product of the strata's Bayes factors is again a martingale. χ² is still shown (for the
users of the current stratum) as a descriptive figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from scipy import stats
from scipy.special import gammaln

SRM_THRESHOLD: Final = 0.001
PRIOR_CONCENTRATION: Final = 1000.0
"""K of the Dirichlet prior: shares deviating by about ½/√K (≈ 1.6 points at 1,000) are the ones the test is
most sensitive to; `vitrine bench stats` measures its detection of a 52/48 split and its false alarms."""


@dataclass(frozen=True)
class SrmResult:
    """Observed vs expected users per variant, the χ² statistic, its p-value and the flag."""

    observed: dict[str, int]
    expected: dict[str, float]
    chi2: float
    p_value: float
    """Always-valid (Dirichlet-multinomial) p-value at this look; `chi2_p_value` is the one-look χ² figure."""
    flagged: bool
    reason: str = ""
    chi2_p_value: float = 1.0


def srm_p_values(observed: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Vectorised χ² p-values; `observed` has the variants on the last axis (any batch axes before)."""
    observed = np.asarray(observed, dtype=float)
    share = np.asarray(weights, dtype=float) / np.sum(weights)
    expected = observed.sum(axis=-1, keepdims=True) * share
    return stats.chisquare(observed, expected, axis=-1).pvalue


def log_bayes_factor(counts: np.ndarray, shares: np.ndarray, concentration: float = PRIOR_CONCENTRATION) -> np.ndarray:
    """``log BF`` of the Dirichlet-multinomial test (Lindon & Malek 2022) for `counts` with the variants on the
    last axis (any batch axes before) against the configured `shares` (summing to 1)."""
    counts = np.asarray(counts, dtype=float)
    shares = np.asarray(shares, dtype=float)
    prior = concentration * shares
    n = counts.sum(axis=-1)
    return (gammaln(concentration) - gammaln(concentration + n)
            + np.sum(gammaln(prior + counts) - gammaln(prior) - counts * np.log(shares), axis=-1))


def check(users: Mapping[str, int], weights: Mapping[str, int], threshold: float = SRM_THRESHOLD) -> SrmResult:
    """Users per variant against the configured weights, one stratum (see `check_strata`)."""
    return check_strata([(users, weights)], threshold)


def check_strata(strata: Sequence[tuple[Mapping[str, int], Mapping[str, int]]], threshold: float = SRM_THRESHOLD) -> SrmResult:
    """The sequential SRM test over strata (users per variant, configured weights) — one per revision of a ramp.

    The p-value is ``1 / Π BF_s`` (capped at 1); flagged when it is below `threshold`. Variants configured
    with weight 0 are left out (they should receive nobody); users in a variant that is not configured, or in
    a zero-weight one, are a mismatch by definition (p = 0). `observed`/`expected` add the strata up; χ² is
    that of the last stratum with users (descriptive).
    """
    observed: dict[str, int] = {}
    expected: dict[str, float] = {}
    stray: set[str] = set()
    log_bf, chi2, chi2_p = 0.0, 0.0, 1.0
    for users, weights in strata:
        active = [v for v, w in weights.items() if w > 0]
        stray |= {v for v, n in users.items() if n > 0 and v not in active}
        counts = np.array([int(users.get(v, 0)) for v in active], dtype=float)
        total = counts.sum()
        wsum = sum(weights[v] for v in active)
        for v, n in users.items():
            observed[v] = observed.get(v, 0) + int(n)
        for v in active:
            expected[v] = expected.get(v, 0.0) + total * weights[v] / wsum
        if len(active) < 2 or total == 0:
            continue
        shares = np.array([weights[v] / wsum for v in active])
        log_bf += float(log_bayes_factor(counts, shares))
        result = stats.chisquare(counts, total * shares)
        chi2, chi2_p = float(result.statistic), float(result.pvalue)
    if stray:
        return SrmResult(observed, expected, float("inf"), 0.0, True, f"users in unconfigured variant(s): {', '.join(sorted(stray))}", 0.0)
    if len(expected) < 2 or sum(observed.values()) == 0:
        return SrmResult(observed, expected, 0.0, 1.0, False, "nothing to compare")
    p = float(min(1.0, np.exp(-log_bf)))
    return SrmResult(observed, expected, chi2, p, p < threshold, "", chi2_p)
