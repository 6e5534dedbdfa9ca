"""An always-valid sequential test: the mixture sequential probability ratio test (mSPRT).

Neither scipy, statsmodels nor spotify-confidence ships an mSPRT for a difference in means, so the
formula is written here. Source: Johari, Koomen, Pekelis, Walsh, "Peeking at A/B Tests: Why it
matters, and what to do about it", KDD 2017, and "Always Valid Inference: Continuous Monitoring of
A/B Tests", Operations Research 70(3), 2022 — the two-sample normal mSPRT with a normal mixing
distribution ``H = N(0, τ²)`` over the true difference θ.

Written in terms of the current estimate ``Δ̂`` of the difference and its variance ``s² = Var(Δ̂)``
(``2σ²/n`` in the paper's equal-allocation notation; here the Welch/delta-method variance of the
estimators module, the plug-in large-sample form of §4 of the 2022 paper), the mixture likelihood
ratio of ``H0: θ = 0`` is

    Λ = √(s² / (s² + τ²)) · exp( τ² Δ̂² / (2 s² (s² + τ²)) ).

Under H0, Λ evaluated after each new user is a non-negative martingale with mean 1, so by Ville's
inequality ``P(sup_n Λ_n ≥ 1/α) ≤ α``: the *always-valid p-value* ``p_n = min(1, min_{k≤n} 1/Λ_k)``
may be watched after every user and acted on whenever it drops below α. Inverting the test gives the
*confidence sequence* (intervals that hold simultaneously at all looks):

    Δ̂ ± √( s² (s² + τ²) / τ² · log((s² + τ²) / (s² α²)) ).

τ (the spread of effects one expects) only tunes *when* the test is most sensitive, never its
validity. `mixture_variance` picks the τ² that makes the confidence sequence tightest at a planned
number of users (Howard, Ramdas, McAuliffe, Sekhon, "Time-uniform, nonparametric, nonasymptotic
confidence sequences", Ann. Statist. 2021, §3.5: ``ρ² = (−2 log α + log(1 − 2 log α)) / m``, which
in our parametrisation is ``τ² = (−2 log α + log(1 − 2 log α)) · s²_horizon``).
"""

from __future__ import annotations

import numpy as np

from vitrine.experiments.estimators import ALPHA


def mixture_variance(variance_now: np.ndarray, users_now: np.ndarray, horizon_users: float, alpha: float = ALPHA) -> np.ndarray:
    """τ² tuned to a horizon (Howard et al. 2021, §3.5): ``c(α) · Var(Δ̂ at the horizon)``.

    ``Var(Δ̂)`` shrinks like 1/users, so its value at the horizon is ``variance_now · users_now /
    horizon_users``; ``c(α) = −2 log α + log(1 − 2 log α)`` (≈ 7.94 at α = 0.05).
    """
    c = -2 * np.log(alpha) + np.log(1 - 2 * np.log(alpha))
    return c * np.asarray(variance_now) * np.asarray(users_now) / horizon_users


def log_likelihood_ratio(delta: np.ndarray, variance: np.ndarray, tau2: np.ndarray) -> np.ndarray:
    """``log Λ`` of the normal-mixture SPRT (Johari et al. 2017, eq. for the two-stream normal case)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        total = variance + tau2
        out = 0.5 * np.log(variance / total) + tau2 * delta**2 / (2 * variance * total)
    return np.where(np.isfinite(out), out, 0.0)


def p_value(delta: np.ndarray, variance: np.ndarray, tau2: np.ndarray) -> np.ndarray:
    """``min(1, 1/Λ)`` at one look. Valid at any data-dependent stopping time (Ville's inequality)."""
    return np.minimum(1.0, np.exp(-log_likelihood_ratio(delta, variance, tau2)))


def always_valid_p_values(delta: np.ndarray, variance: np.ndarray, tau2: np.ndarray) -> np.ndarray:
    """Running minimum over looks (last axis) of the per-look p-value: ``p_n = min_{k≤n} min(1, 1/Λ_k)``."""
    return np.minimum.accumulate(p_value(delta, variance, tau2), axis=-1)


def confidence_sequence(delta: np.ndarray, variance: np.ndarray, tau2: np.ndarray, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """The ``1 − α`` confidence sequence at one look (the set of θ that the mSPRT does not reject).

    Intersect over looks (running max of lows, running min of highs) for the monotone version.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        total = variance + tau2
        half = np.sqrt(variance * total / tau2 * np.log(total / (variance * alpha**2)))
    return delta - half, delta + half


def rejects(delta: np.ndarray, variance: np.ndarray, tau2: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Whether the test has rejected at *any* look so far (last axis = looks): ``max_k Λ_k ≥ 1/α``."""
    return np.any(log_likelihood_ratio(delta, variance, tau2) >= -np.log(alpha), axis=-1)


def planned_tau2(per_user_variance: np.ndarray, planned_users: float, alpha: float = ALPHA) -> np.ndarray:
    """τ² tuned to a *planned* number of users per variant, from the per-user variance of Δ̂
    (``Var(Δ̂) · users``): ``c(α) · per_user_variance / planned_users`` (Howard et al. 2021, §3.5).

    Fixed once per experiment (the decision stores it at its first look): one τ for every look keeps the
    running minimum a minimum over one martingale.
    """
    c = -2 * np.log(alpha) + np.log(1 - 2 * np.log(alpha))
    return c * np.asarray(per_user_variance) / planned_users


# --- a sequential test of a share: the beta-binomial mixture ----------------------------------------
#
# For votes X_1, X_2, … ∈ {0, 1} that are fair coins under H0 (p = ½), the mixture of likelihood ratios
# over a Beta(a, a) prior on p,
#
#     Λ_n = ∫ Π (p/½)^X_i ((1−p)/½)^(1−X_i) dBeta(p; a, a) = 2^n · B(a + k, a + n − k) / B(a, a),
#
# (k = Σ X_i) is a non-negative martingale with mean 1 under H0 (Robbins, "Statistical methods related to
# the law of the iterated logarithm", Ann. Math. Statist. 1970; Howard et al. 2021, §3.2 "beta-binomial
# mixture"), so p_n = min(1, min_{m≤n} 1/Λ_m) is an always-valid p-value — exactly, not asymptotically:
# it holds from the first vote, where the normal approximation of the mSPRT would not. The confidence
# sequence of p inverts the same mixture: {p : B(a+k, a+n−k)/B(a, a) / (p^k (1−p)^(n−k)) < 1/α}.


def beta_prior_for(planned_votes: float, alpha: float = ALPHA) -> float:
    """The prior's a for Beta(a, a), matched to the mSPRT's planned τ: the prior's variance
    ``1 / (4(2a + 1))`` equals ``c(α) · ¼ / planned_votes`` (the per-vote variance under H0 is ¼)."""
    c = -2 * np.log(alpha) + np.log(1 - 2 * np.log(alpha))
    return float(max(0.5, (planned_votes / c - 1) / 2))


def log_beta_binomial_ratio(k: np.ndarray, n: np.ndarray, a: float, p0: np.ndarray | float = 0.5) -> np.ndarray:
    """``log Λ`` of the beta-binomial mixture against ``p = p0`` after k successes in n votes."""
    from scipy.special import betaln

    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    p0 = np.asarray(p0, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        null = np.where(k > 0, k * np.log(p0), 0.0) + np.where(n - k > 0, (n - k) * np.log1p(-p0), 0.0)
    return betaln(a + k, a + n - k) - betaln(a, a) - null


def share_p_value(k: np.ndarray, n: np.ndarray, a: float) -> np.ndarray:
    """``min(1, 1/Λ)`` at one look (take the running minimum over looks for the always-valid p-value)."""
    return np.minimum(1.0, np.exp(-log_beta_binomial_ratio(k, n, a)))


def share_confidence_sequence(k: int, n: int, a: float, alpha: float = ALPHA) -> tuple[float, float]:
    """The ``1 − α`` confidence sequence of the share at one look: the p0 the mixture does not reject.

    ``log Λ(p0)`` is convex in p0 with its minimum at k/n, so each bound is found by bisection.
    """
    if n == 0:
        return 0.0, 1.0
    bound = -np.log(alpha)
    centre = k / n

    def inside(p0: float) -> bool:
        return float(log_beta_binomial_ratio(k, n, a, p0)) < bound

    def edge(outer: float) -> float:
        if inside(outer):
            return outer
        lo, hi = centre, outer  # lo inside, hi outside
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if inside(mid) else (lo, mid)
        return lo

    return edge(1e-12), edge(1 - 1e-12)
