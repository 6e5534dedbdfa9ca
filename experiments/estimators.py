"""Per-variant estimates with the user as the unit: means, ratio metrics, lifts and the fixed-horizon test.

Every metric is written as a *ratio of per-user sums*, ``R = Σ y_i / Σ x_i`` over the users ``i`` of a
variant. A per-user mean (purchases per user, conversion) is the special case ``x_i = 1``; click-through
rate is ``y = clicks``, ``x = impressions``. CTR is *not* a per-user mean — the impressions of one user
are correlated (the same person sees them), so the binomial variance ``R(1-R)/Σx`` is too small (an
A/A test with it rejects far more often than α; `vitrine bench stats` measures by how much). The
variance used everywhere here is the delta method's (Deng, Knoblich, Lu, "Applying the Delta Method
in Metric Analytics", KDD 2018, §2–3):

    Var(R) ≈ (s_yy − 2 R s_xy + R² s_xx) / (n x̄²)

with the sample (co)variances ``s`` of the per-user values (denominator n − 1) and ``x̄ = Σx / n``.
It is the variance of the mean of the *linearised* per-user values ``L_i = R + (y_i − R x_i) / x̄``,
which is why CUPED and the sequential test can treat ratio metrics like plain means.

All functions work on numpy arrays with any leading batch axes (the simulations evaluate thousands
of experiments at once through the same code the report uses); the user axis is the last one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
from scipy import stats

ALPHA: Final = 0.05


@dataclass(frozen=True)
class Moments:
    """Sums over users of a ratio metric's numerator y, denominator x and (optional) covariate z.

    These are sufficient for the estimate, its delta-method variance and the CUPED adjustment, and
    they add up: the statistic after k users is a cumulative sum, which is how the sequential test is
    evaluated at every look without keeping state beyond the rows.
    """

    n: np.ndarray
    sy: np.ndarray
    sx: np.ndarray
    syy: np.ndarray
    sxx: np.ndarray
    sxy: np.ndarray
    sz: np.ndarray | None = None
    szz: np.ndarray | None = None
    syz: np.ndarray | None = None
    sxz: np.ndarray | None = None

    @classmethod
    def of(cls, y: np.ndarray, x: np.ndarray | None = None, z: np.ndarray | None = None, *,
           mask: np.ndarray | None = None, cumulative: bool = False) -> Moments:
        """Moments over the last axis (users); `mask` selects users (e.g. one variant), `cumulative`
        keeps the user axis and gives the moments after each user (for looks)."""
        y = np.asarray(y, dtype=float)
        x = np.ones_like(y) if x is None else np.asarray(x, dtype=float)
        w = np.ones_like(y) if mask is None else np.asarray(mask, dtype=float)
        total = (lambda a: np.cumsum(a, axis=-1)) if cumulative else (lambda a: np.sum(a, axis=-1))
        wy, wx = w * y, w * x
        sums = dict(n=total(w), sy=total(wy), sx=total(wx), syy=total(wy * y), sxx=total(wx * x), sxy=total(wy * x))
        if z is not None:
            z = np.asarray(z, dtype=float)
            wz = w * z
            sums |= dict(sz=total(wz), szz=total(wz * z), syz=total(wy * z), sxz=total(wx * z))
        return cls(**sums)

    def at(self, index: np.ndarray | int) -> Moments:
        """The cumulative moments at the given user positions (last axis) — one look each."""
        pick = (lambda a: None if a is None else np.take(a, index, axis=-1))
        return Moments(**{k: pick(v) for k, v in self.__dict__.items()})


def _cov(n: np.ndarray, sa: np.ndarray, sb: np.ndarray, sab: np.ndarray) -> np.ndarray:
    """Sample covariance (denominator n − 1) from sums."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (sab - sa * sb / n) / (n - 1)


def ratio(m: Moments) -> tuple[np.ndarray, np.ndarray]:
    """Estimate ``R = Σy/Σx`` and its delta-method variance (Deng et al. 2018, eq. for a ratio of means).

    For ``x ≡ 1`` this is the sample mean and ``s²/n``, the usual variance of a mean.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        r = m.sy / m.sx
        xbar = m.sx / m.n
        lin = _cov(m.n, m.sy, m.sy, m.syy) - 2 * r * _cov(m.n, m.sy, m.sx, m.sxy) + r**2 * _cov(m.n, m.sx, m.sx, m.sxx)
        return r, np.maximum(lin, 0.0) / (m.n * xbar**2)


def linearised_variance(m: Moments) -> np.ndarray:
    """Per-user variance of the linearised values ``L_i`` (so that ``Var(R) = this / n``)."""
    _, var = ratio(m)
    return var * m.n


def binomial_ratio_variance(m: Moments) -> np.ndarray:
    """The *naive* variance ``R(1−R)/Σx`` that treats every impression as independent.

    Kept only to show in the A/A benchmark why it must not be used for CTR (users are the unit).
    """
    r = m.sy / m.sx
    return r * (1 - r) / m.sx


def normal_interval(estimate: np.ndarray, variance: np.ndarray, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided ``1 − α`` normal interval ``estimate ± z_{1−α/2} · √variance``."""
    half = stats.norm.ppf(1 - alpha / 2) * np.sqrt(variance)
    return estimate - half, estimate + half


def difference(t: tuple[np.ndarray, np.ndarray], c: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Absolute lift ``R_t − R_c``; independent groups (randomised users), so the variances add."""
    return t[0] - c[0], t[1] + c[1]


def relative_difference(t: tuple[np.ndarray, np.ndarray], c: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Relative lift ``R_t / R_c − 1`` with the delta-method variance of a quotient of independent
    estimates (Deng et al. 2018, §3.3 "percent change"):

        Var(R_t/R_c) ≈ Var(R_t)/R_c² + R_t² Var(R_c)/R_c⁴
    """
    (rt, vt), (rc, vc) = t, c
    with np.errstate(divide="ignore", invalid="ignore"):
        return rt / rc - 1, vt / rc**2 + rt**2 * vc / rc**4


def welch_df(vt: np.ndarray, nt: np.ndarray, vc: np.ndarray, nc: np.ndarray) -> np.ndarray:
    """Welch–Satterthwaite degrees of freedom from each arm's variance *of the estimate* and users.

    ``df = (v_t + v_c)² / (v_t²/(n_t−1) + v_c²/(n_c−1))`` (Welch 1947); for ratio metrics the
    linearised per-user values play the part of the observations.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return (vt + vc) ** 2 / (vt**2 / (nt - 1) + vc**2 / (nc - 1))


def fixed_horizon_p_value(delta: np.ndarray, variance: np.ndarray, df: np.ndarray | None = None) -> np.ndarray:
    """Two-sided p-value of ``H0: Δ = 0``: Welch's t when `df` is given (scipy's t distribution), else z.

    Valid for one look at a sample size fixed in advance; looking repeatedly and stopping at the first
    p < α inflates the false-positive rate (Johari et al. 2017) — use `sequential` for that.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.abs(delta) / np.sqrt(variance)
    if df is None:
        return 2 * stats.norm.sf(t)
    return 2 * stats.t.sf(t, df)
