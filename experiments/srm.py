"""Sample-ratio mismatch: are the users split the way the experiment was configured?

A χ² goodness-of-fit test (Pearson; `scipy.stats.chisquare`) of the observed users per variant
against the configured weights. A mismatch means assignment or logging is broken (a variant that
crashes for some users, bots filtered on one side, a redirect that loses users…), and then no lift
is trustworthy — Fabijan et al., "Diagnosing Sample Ratio Mismatch in Online Controlled
Experiments", KDD 2019. The threshold is p < 0.001, not 0.05: the check runs on every experiment at
every look, so a strict threshold keeps false alarms rare (measured by `vitrine bench stats`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
from scipy import stats

SRM_THRESHOLD: Final = 0.001


@dataclass(frozen=True)
class SrmResult:
    """Observed vs expected users per variant, the χ² statistic, its p-value and the flag."""

    observed: dict[str, int]
    expected: dict[str, float]
    chi2: float
    p_value: float
    flagged: bool
    reason: str = ""


def srm_p_values(observed: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Vectorised χ² p-values; `observed` has the variants on the last axis (any batch axes before)."""
    observed = np.asarray(observed, dtype=float)
    share = np.asarray(weights, dtype=float) / np.sum(weights)
    expected = observed.sum(axis=-1, keepdims=True) * share
    return stats.chisquare(observed, expected, axis=-1).pvalue


def check(users: Mapping[str, int], weights: Mapping[str, int], threshold: float = SRM_THRESHOLD) -> SrmResult:
    """χ² of users per variant against the configured weights; flagged when p < `threshold`.

    Variants configured with weight 0 are left out (they should receive nobody); users in a variant
    that is not configured, or in a zero-weight one, are a mismatch by definition (p = 0).
    """
    active = [v for v, w in weights.items() if w > 0]
    stray = sorted(v for v, n in users.items() if n > 0 and v not in active)
    observed = {v: int(users.get(v, 0)) for v in active}
    total = sum(observed.values())
    wsum = sum(weights[v] for v in active)
    expected = {v: total * weights[v] / wsum for v in active}
    if stray:
        return SrmResult(observed | {v: int(users[v]) for v in stray}, expected, float("inf"), 0.0, True,
                         f"users in unconfigured variant(s): {', '.join(stray)}")
    if len(active) < 2 or total == 0:
        return SrmResult(observed, expected, 0.0, 1.0, False, "nothing to compare")
    result = stats.chisquare(list(observed.values()), list(expected.values()))
    p = float(result.pvalue)
    return SrmResult(observed, expected, float(result.statistic), p, p < threshold)
