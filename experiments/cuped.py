"""CUPED: less variance from a pre-experiment covariate (Deng, Xu, Kohavi, Walker, "Improving the
Sensitivity of Online Controlled Experiments by Utilizing Pre-Experiment Data", WSDM 2013).

For a metric Y and a covariate X measured *before* the user's first exposure (here: the user's
events before the experiment, `UserOutcome.pre_events`), the adjusted estimate of a variant is

    Ŷ_cv = Ȳ_v − θ (X̄_v − X̄),     θ = cov(Y, X) / var(X)           (Deng et al. 2013, §3.1–3.3)

X is independent of the assignment, so ``E[X̄_v − X̄] = 0`` and the adjustment removes noise without
bias, for any fixed θ; the θ above minimises the variance, which falls by the factor ``1 − ρ²``
(ρ = corr(Y, X)). One θ for all variants: a per-variant θ would let the treatment effect leak into
the adjustment (§3.3). We estimate it *pooled within variants*, ``Σ_v (n_v−1) cov_v / Σ_v (n_v−1)
var_v``, so that a real difference in Ȳ between variants does not enter cov(Y, X) through a chance
difference in X̄_v.

Ratio metrics (CTR) use their linearised per-user values ``L_i = R + (y_i − R x_i)/x̄`` in place of
Y (Deng, Knoblich, Lu, KDD 2018, §4 applies CUPED to delta-method metrics this way), so

    cov(L, X) = (cov(y, X) − R cov(x, X)) / x̄.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vitrine.experiments.estimators import Moments, _cov, ratio


def _parts(m: Moments) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(R, var(L), cov(L, z), var(z)) of one variant, per user (not yet divided by n)."""
    if m.sz is None:
        raise ValueError("these moments carry no covariate (Moments.of(..., z=...))")
    r, var_r = ratio(m)
    xbar = m.sx / m.n
    cov_lz = (_cov(m.n, m.sy, m.sz, m.syz) - r * _cov(m.n, m.sx, m.sz, m.sxz)) / xbar
    return r, var_r * m.n, cov_lz, _cov(m.n, m.sz, m.sz, m.szz)


def theta(variants: Sequence[Moments]) -> np.ndarray:
    """θ = cov(L, X) / var(X), pooled within variants (weights n_v − 1)."""
    num = sum((m.n - 1) * _parts(m)[2] for m in variants)
    den = sum((m.n - 1) * _parts(m)[3] for m in variants)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, 0.0)


def adjusted(m: Moments, theta_: np.ndarray, z_mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The CUPED estimate of one variant and its variance ``var(L − θX) / n``.

    `z_mean` is the covariate's mean over all users of the experiment (X̄ in the formula).
    """
    r, var_l, cov_lz, var_z = _parts(m)
    estimate = r - theta_ * (m.sz / m.n - z_mean)
    variance = np.maximum(var_l - 2 * theta_ * cov_lz + theta_**2 * var_z, 0.0) / m.n
    return estimate, variance


def adjust_all(variants: Sequence[Moments]) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """θ and the adjusted (estimate, variance) of every variant, with X̄ pooled over all of them."""
    th = theta(variants)
    z_mean = sum(m.sz for m in variants) / sum(m.n for m in variants)
    return th, [adjusted(m, th, z_mean) for m in variants]


def variance_reduction(unadjusted_variance: np.ndarray, adjusted_variance: np.ndarray) -> np.ndarray:
    """``1 − Var_cuped / Var``: the share of variance removed (≈ ρ²); users needed shrink by the same factor."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1 - adjusted_variance / unadjusted_variance
