"""Proof by simulation of the tests *as the decision uses them* (`vitrine bench stats`, the unit tests).

`simulation` proves each test at one look; this module proves what `decision` does with them over a whole
experiment: looks every few users, revisions with other weights (a ramp), CUPED inside the sequential test,
several variants (Holm), interleaving's always-valid test, the sequential SRM check, non-inferiority
guardrails, and the users needed for 80 % power by the rule that decides. It uses the same generative model
(`simulation.draw_users`, `ab_outcomes`, `interleaved_outcomes`) and the same functions the service uses
(`estimators`, `cuped`, `sequential`, `srm`, `decision.holm`).

Sampling error: a rate r measured over R experiments has a binomial standard error √(r(1−r)/R); the bounds in
the tests and the docs are "α + 3 SE".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from vitrine.experiments import cuped, sequential, srm
from vitrine.experiments.estimators import ALPHA, Moments, difference, ratio
from vitrine.experiments.interleaving import sign_test_p_values, user_votes
from vitrine.experiments.simulation import _chunks, ab_outcomes, calibrate, draw_users, interleaved_outcomes

Progress = Callable[[str], None]


def _combined(cells: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]], strata: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-variance Δ̂ (treatment 1 − control 0) over strata, per experiment and look; a stratum whose arms
    lack two users (variance not finite) gets weight 0 — exactly `analysis.combine`, vectorised."""
    num = np.zeros_like(cells[(strata[0], 0)][0])
    den = np.zeros_like(num)
    for s in strata:
        delta, var = difference(cells[(s, 1)], cells[(s, 0)])
        ok = np.isfinite(delta) & np.isfinite(var) & (var > 0)
        w = np.where(ok, 1.0 / np.where(ok, var, 1.0), 0.0)
        num += w * np.where(ok, delta, 0.0)
        den += w
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den, 1.0 / den


def _rejects(delta: np.ndarray, var: np.ndarray, users_t: np.ndarray, planned: int, alpha: float) -> np.ndarray:
    """Whether the mSPRT (τ² fixed at the first informative look from the planned users) rejects at any look."""
    ok = np.isfinite(delta) & np.isfinite(var) & (var > 0)
    first = np.argmax(ok, axis=-1)
    rows = np.arange(delta.shape[0])
    tau2 = sequential.planned_tau2(var[rows, first] * users_t[rows, first], planned, alpha)[:, None]
    llr = sequential.log_likelihood_ratio(np.where(ok, delta, 0.0), np.where(ok, var, 1.0), np.where(ok, tau2, 0.0))
    return np.any(ok & (llr >= -np.log(alpha)), axis=-1)


# --- A/A through a ramp of revisions ---------------------------------------------------------------


@dataclass(frozen=True)
class RampAA:
    experiments: int
    users: int
    shares: tuple[float, ...]
    """Treatment's share in each revision (users split evenly between revisions, in arrival order)."""
    trend: float
    """Click propensity of later revisions' users relative to the first's (a weekday/weekend shift)."""
    look_every: int
    alpha: float
    one_alpha_stratified: float
    """The decision: one running minimum over every look of every revision, strata by entry revision."""
    one_alpha_stratified_cuped: float
    """The same on the CUPED-adjusted difference (the decision when a covariate exists)."""
    fresh_alpha_per_revision: float
    """The old rule: a new running minimum (p = 1) at every revision."""
    one_alpha_pooled: float
    """One running minimum, but users pooled across revisions without strata (Simpson's paradox under a trend)."""
    sampling_error: float


def simulate_ramp_aa(experiments: int = 1000, users: int = 6000, shares: tuple[float, ...] = (0.1, 0.5), trend: float = 0.3,
                     look_every: int = 50, planned: int = 3000, alpha: float = ALPHA, seed: int = 41,
                     progress: Progress | None = None) -> RampAA:
    """A/A experiments (one ranker in both arms) whose treatment share ramps through `shares`, peeked every
    `look_every` users from the first look with both arms present, judged four ways (see `RampAA`)."""
    rng = np.random.default_rng(seed)
    per = users // len(shares)
    stratum = np.minimum(np.arange(users) // per, len(shares) - 1)
    share = np.asarray(shares)[stratum]
    look_at = np.arange(look_every - 1, users, look_every)
    counts = dict(strat=0, cuped=0, fresh=0, pooled=0)
    strata = list(range(len(shares)))
    for size in _chunks(experiments, users):
        pop = draw_users((size, users), rng)
        boosted = pop.activity * np.where(stratum > 0, 1 + trend, 1.0)
        pop = type(pop)(boosted, pop.exposures, pop.pre_events, pop.relevance, pop.noise)
        impr, clicks = ab_outcomes(pop, 0.3, rng)
        arm = (rng.random((size, users)) < share).astype(int)
        cells, adj_cells, moments = {}, {}, {}
        for s in strata:
            for a in (0, 1):
                moments[(s, a)] = Moments.of(clicks, impr, pop.pre_events, mask=(arm == a) & (stratum == s), cumulative=True).at(look_at)
                cells[(s, a)] = ratio(moments[(s, a)])
        with np.errstate(divide="ignore", invalid="ignore"):
            theta = cuped.theta(list(moments.values()))
            for s in strata:
                z_mean = (moments[(s, 0)].sz + moments[(s, 1)].sz) / (moments[(s, 0)].n + moments[(s, 1)].n)
                for a in (0, 1):
                    adj_cells[(s, a)] = cuped.adjusted(moments[(s, a)], theta, z_mean)
        users_t = sum(moments[(s, 1)].n for s in strata)
        counts["strat"] += int(np.sum(_rejects(*_combined(cells, strata), users_t, planned, alpha)))
        counts["cuped"] += int(np.sum(_rejects(*_combined(adj_cells, strata), users_t, planned, alpha)))
        fresh = np.zeros(size, dtype=bool)
        for s in strata:
            in_rev = (look_at // per == s) if s < len(shares) - 1 else (look_at // per >= s)
            d, v = _combined({k: (e[0][:, in_rev], e[1][:, in_rev]) for k, e in cells.items() if k[0] == s}, [s])
            fresh |= _rejects(d, v, moments[(s, 1)].n[:, in_rev], planned, alpha)
        counts["fresh"] += int(np.sum(fresh))
        pooled = {a: ratio(Moments.of(clicks, impr, mask=arm == a, cumulative=True).at(look_at)) for a in (0, 1)}
        counts["pooled"] += int(np.sum(_rejects(*difference(pooled[1], pooled[0]), users_t, planned, alpha)))
        if progress:
            progress(f"ramp A/A: {size} experiments")
    r = {k: v / experiments for k, v in counts.items()}
    return RampAA(experiments, users, tuple(shares), 1 + trend, look_every, alpha, r["strat"], r["cuped"], r["fresh"], r["pooled"],
                  float(np.sqrt(alpha * (1 - alpha) / experiments)))


# --- several variants: Holm ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ManyVariantsAA:
    experiments: int
    variants: int
    users_per_arm: int
    holm_fwer: float
    """Share of A/A experiments in which Holm over the always-valid p-values names any winner."""
    uncorrected_fwer: float


def simulate_many_variants_aa(experiments: int = 1000, variants: int = 4, users_per_arm: int = 1000, look_every: int = 50,
                              planned: int = 1000, alpha: float = ALPHA, seed: int = 43) -> ManyVariantsAA:
    """A/A with control and `variants − 1` treatments (the same ranker everywhere), peeked every `look_every` users."""
    rng = np.random.default_rng(seed)
    users = variants * users_per_arm
    look_at = np.arange(look_every * variants - 1, users, look_every * variants)
    holm_hits = raw_hits = 0
    for size in _chunks(experiments, users):
        impr, clicks = ab_outcomes(draw_users((size, users), rng), 0.3, rng)
        arm = rng.integers(0, variants, size=(size, users))
        m = [Moments.of(clicks, impr, mask=arm == a, cumulative=True).at(look_at) for a in range(variants)]
        est = [ratio(x) for x in m]
        p_min = []
        for a in range(1, variants):
            delta, var = difference(est[a], est[0])
            tau2 = sequential.planned_tau2(var[:, :1] * m[a].n[:, :1], planned, alpha)
            p_min.append(np.min(sequential.p_value(delta, var, tau2), axis=-1))
        p_min = np.stack(p_min, axis=-1)
        raw_hits += int(np.sum(np.any(p_min < alpha, axis=-1)))
        # Holm rejects anything exactly when its first step does: the smallest p below α / m
        holm_hits += int(np.sum(np.min(p_min, axis=-1) * (variants - 1) < alpha))
    return ManyVariantsAA(experiments, variants, users_per_arm, holm_hits / experiments, raw_hits / experiments)


# --- interleaving under peeking -------------------------------------------------------------------------


@dataclass(frozen=True)
class InterleavingAA:
    experiments: int
    first_vote: int
    votes: int
    fixed_one_look: float
    fixed_peeked: float
    always_valid_peeked: float


def simulate_interleaving_aa(experiments: int = 20_000, first_vote: int = 10, votes: int = 1000, planned_votes: int = 1000,
                             alpha: float = ALPHA, seed: int = 44) -> InterleavingAA:
    """No preference: each vote a fair coin, re-read after every vote from `first_vote` to `votes`."""
    rng = np.random.default_rng(seed)
    a = sequential.beta_prior_for(planned_votes, alpha)
    n = np.arange(first_vote, votes + 1)
    hits = dict(one=0, peek=0, seq=0)
    for size in _chunks(experiments, votes, 2_000_000):
        k = np.cumsum(rng.random((size, votes)) < 0.5, axis=-1)[:, first_vote - 1:]
        fixed = sign_test_p_values(k, n - k)
        hits["one"] += int(np.sum(fixed[:, -1] < alpha))
        hits["peek"] += int(np.sum(np.any(fixed < alpha, axis=-1)))
        hits["seq"] += int(np.sum(np.any(sequential.log_beta_binomial_ratio(k, n, a) >= -np.log(alpha), axis=-1)))
    return InterleavingAA(experiments, first_vote, votes, hits["one"] / experiments, hits["peek"] / experiments, hits["seq"] / experiments)


# --- SRM under continuous checking ----------------------------------------------------------------------


@dataclass(frozen=True)
class SrmContinuous:
    experiments: int
    first_check: int
    users: int
    chi2_false_alarms: float
    """χ² at p < 0.001, checked after every user: share of true 50/50 experiments ever flagged."""
    sequential_false_alarms: float
    sequential_detection: float
    """Share of planted 52/48 experiments flagged by `users` users (sequential test, checked after every user)."""
    planted_share: float


def _srm_boundary(n: np.ndarray, threshold: float) -> np.ndarray:
    """For each n, the smallest count of one of two equal arms (≥ n/2) that the sequential test flags."""
    bound = -np.log(threshold)
    lo, hi = np.ceil(n / 2), n.astype(float)
    flagged_at_top = srm.log_bayes_factor(np.stack([hi, n - hi], -1), np.array([0.5, 0.5])) >= bound
    for _ in range(40):
        mid = np.floor((lo + hi) / 2)
        flag = srm.log_bayes_factor(np.stack([mid, n - mid], -1), np.array([0.5, 0.5])) >= bound
        hi, lo = np.where(flag, mid, hi), np.where(flag, lo, mid + 1)
    return np.where(flagged_at_top, hi, n + 1)


def simulate_srm_continuous(experiments: int = 20_000, users: int = 20_000, first_check: int = 100, planted_share: float = 0.52,
                            threshold: float = srm.SRM_THRESHOLD, seed: int = 45) -> SrmContinuous:
    """A 50/50 split checked after every user from `first_check` to `users`, by χ² and by the sequential test."""
    rng = np.random.default_rng(seed)
    n = np.arange(first_check, users + 1)
    upper = _srm_boundary(n, threshold)
    chi_half = np.sqrt(stats.chi2.isf(threshold, 1) * n / 4)
    hits = dict(chi=0, seq=0, det=0)
    for size in _chunks(experiments, users, 40_000_000):
        for share, keys in ((0.5, ("chi", "seq")), (planted_share, ("det",))):
            a = np.cumsum(rng.random((size, users), dtype=np.float32) < share, axis=-1, dtype=np.int32)[:, first_check - 1:]
            far = np.maximum(a, n - a)
            if "chi" in keys:
                hits["chi"] += int(np.sum(np.any(np.abs(a - n / 2) > chi_half, axis=-1)))
            hits[keys[-1]] += int(np.sum(np.any(far >= upper, axis=-1)))
    return SrmContinuous(experiments, first_check, users, hits["chi"] / experiments, hits["seq"] / experiments,
                         hits["det"] / experiments, planted_share)


# --- power and users needed as decided --------------------------------------------------------------------


def gaussian_sequential_power(delta: float, per_user_var: float, users_per_arm: int, planned: int, looks: int = 50,
                              paths: int = 20_000, alpha: float = ALPHA, seed: int = 46) -> float:
    """Power of the mSPRT read at `looks` equally spaced looks, in the large-sample (Brownian) approximation:
    Δ̂ after n users per arm is δ + B(n)/n with Var(B(n)) = n · per_user_var (per_user_var = Var(Δ̂) · n)."""
    rng = np.random.default_rng(seed)
    n = np.linspace(users_per_arm / looks, users_per_arm, looks)
    steps = np.diff(np.concatenate([[0.0], n]))
    b = np.cumsum(rng.standard_normal((paths, looks)) * np.sqrt(steps * per_user_var), axis=-1)
    est, var = delta + b / n, per_user_var / n
    tau2 = sequential.planned_tau2(per_user_var, planned, alpha)
    return float(np.mean(sequential.rejects(est, var, tau2, alpha)))


def users_for_power(power_at: Callable[[int], float], target: float = 0.8, low: int = 50, high: int = 2_000_000) -> int:
    """Smallest n with power_at(n) ≥ target (bisection; power_at increasing in n)."""
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if power_at(mid) >= target else (mid + 1, high)
    return low


def simulated_sequential_power(users_per_arm: int, experiments: int, sigma_a: float, planned: int, use_cuped: bool,
                               sigma_b: float = 0.0, looks: int = 50, alpha: float = ALPHA, seed: int = 47) -> float:
    """Power of the decision's test (mSPRT, τ² from the first look and the planned users, running minimum over
    `looks` looks; CUPED-adjusted if asked) in the full user model, ranker A (σ_a) against B (σ_b)."""
    rng = np.random.default_rng(seed)
    look_at = np.linspace(users_per_arm / looks, users_per_arm, looks).astype(int) - 1
    hits = 0
    for size in _chunks(experiments, 2 * users_per_arm):
        m = []
        for sigma in (sigma_a, sigma_b):
            pop = draw_users((size, users_per_arm), rng)
            impr, clicks = ab_outcomes(pop, sigma, rng)
            m.append(Moments.of(clicks, impr, pop.pre_events, cumulative=True).at(look_at))
        if use_cuped:
            _, (c, t) = cuped.adjust_all(m)
        else:
            c, t = ratio(m[0]), ratio(m[1])
        delta, var = difference(t, c)
        hits += int(np.sum(_rejects(delta, var, m[1].n, planned, alpha)))
    return hits / experiments


def simulated_interleaving_power(users: int, experiments: int, sigma_a: float, planned_votes: int, sigma_b: float = 0.0,
                                 looks: int = 50, alpha: float = ALPHA, seed: int = 48) -> float:
    """Power of the beta-binomial mixture on per-user votes, read at `looks` looks, in the full interleaving model."""
    rng = np.random.default_rng(seed)
    a = sequential.beta_prior_for(planned_votes, alpha)
    look_at = np.linspace(users / looks, users, looks).astype(int)
    hits = 0
    for size in _chunks(experiments, users):
        wins_a, wins_b = interleaved_outcomes(draw_users((size, users), rng), sigma_a, sigma_b, rng)
        k_b = np.cumsum(wins_b > wins_a, axis=-1)[:, look_at - 1]
        n = k_b + np.cumsum(wins_a > wins_b, axis=-1)[:, look_at - 1]
        hits += int(np.sum(np.any(sequential.log_beta_binomial_ratio(k_b, n, a) >= -np.log(alpha), axis=-1)))
    return hits / experiments


@dataclass(frozen=True)
class AsDecided:
    """Users (both arms together; interleaving: every user) for 80 % power at a planted +10 % CTR, by the rule
    that decides (sequential, read at 50 looks, τ tuned to that size), and the simulated power there."""

    sigma_a: float
    ab: int
    ab_power: float
    ab_cuped: int
    ab_cuped_power: float
    interleaving: int
    interleaving_power: float
    fixed_horizon_ab: int
    """For comparison: the one-look Welch test's users (the old table's figure)."""
    tau_effect: dict[str, float]
    """Power at the A/B figure with τ tuned for other planned sizes (Gaussian approximation)."""
    experiments: int


def as_decided(experiments: int = 400, seed: int = 49, progress: Progress | None = None) -> AsDecided:
    from vitrine.experiments.simulation import users_needed

    say = progress or (lambda _m: None)
    sigma_a, _ = calibrate()
    need = users_needed(sigma_a, seed=seed)
    rng = np.random.default_rng(seed + 1)
    m = []
    pops = []
    for sigma in (sigma_a, 0.0):
        pop = draw_users((200_000,), rng)
        impr, clicks = ab_outcomes(pop, sigma, rng)
        m.append(Moments.of(clicks, impr, pop.pre_events))
        pops.append(pop)
    (ra, va), (rb, vb) = ratio(m[0]), ratio(m[1])
    delta = float(rb - ra)
    per_user = float((va + vb) * 200_000)
    _, (adj_a, adj_b) = cuped.adjust_all(m)
    per_user_cuped = float((adj_a[1] + adj_b[1]) * 200_000)
    say("users needed by the sequential test …")
    n_ab = users_for_power(lambda n: gaussian_sequential_power(delta, per_user, n, n, seed=seed + 2))
    n_cuped = users_for_power(lambda n: gaussian_sequential_power(delta, per_user_cuped, n, n, seed=seed + 3))
    say("power there, full model …")
    p_ab = simulated_sequential_power(n_ab, experiments, sigma_a, n_ab, use_cuped=False, seed=seed + 4)
    p_cuped = simulated_sequential_power(n_cuped, experiments, sigma_a, n_cuped, use_cuped=True, seed=seed + 5)
    say("interleaving …")
    wins_a, wins_b = interleaved_outcomes(pops[0], sigma_a, 0.0, rng)
    pa, pb = (float(v) for v in user_votes(wins_a, wins_b))
    voting, pref_b = (pa + pb) / pops[0].activity.size, pb / (pa + pb)

    def il_power(users: int) -> float:
        votes = rng.binomial(1, voting, size=(4000, users)).astype(bool)
        k = np.cumsum(votes & (rng.random((4000, users)) < pref_b), axis=-1)
        n = np.cumsum(votes, axis=-1)
        at = np.linspace(users / 50, users, 50).astype(int) - 1
        a = sequential.beta_prior_for(max(users * voting, 1), ALPHA)
        return float(np.mean(np.any(sequential.log_beta_binomial_ratio(k[:, at], n[:, at], a) >= -np.log(ALPHA), axis=-1)))

    n_il = users_for_power(il_power, low=20, high=20_000)
    p_il = simulated_interleaving_power(n_il, experiments, sigma_a, int(n_il * voting), seed=seed + 6)
    effect = {f"τ for {label}": gaussian_sequential_power(delta, per_user, n_ab, planned, seed=seed + 7)
              for label, planned in (("¼ of it", n_ab // 4), ("it", n_ab), ("4× it", 4 * n_ab), ("10,000 per arm (old default)", 10_000))}
    return AsDecided(sigma_a, 2 * n_ab, p_ab, 2 * n_cuped, p_cuped, n_il, p_il, need.ab, effect, experiments)


# --- non-inferiority guardrails ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NonInferiorityRates:
    experiments: int
    users_per_arm: int
    margin: float
    false_non_inferior: float
    """Treatment exactly `margin` worse: share declared non-inferior at some look (must be ≤ α)."""
    false_worse: float
    """A/A: share declared worse at some look (must be ≤ α)."""
    non_inferior_power: float
    """A/A: share declared non-inferior by the last look."""


def simulate_non_inferiority(experiments: int = 400, users_per_arm: int = 4000, margin: float = 0.05, looks: int = 50,
                             planned: int = 4000, alpha: float = ALPHA, seed: int = 50) -> NonInferiorityRates:
    """The guardrail rule of `decision.guardrails` (running intersection of the confidence sequence against
    ``−margin × control``) on CTR: at the boundary (treatment exactly `margin` worse) and in an A/A."""
    sigma_worse, _ = calibrate(lift=1 / (1 - margin) - 1)
    rng = np.random.default_rng(seed)
    look_at = np.linspace(users_per_arm / looks, users_per_arm, looks).astype(int) - 1
    hits = dict(ni=0, worse=0, power=0)
    for sigma_t, keys in ((sigma_worse, ("ni",)), (0.0, ("worse", "power"))):
        for size in _chunks(experiments, 2 * users_per_arm):
            m = []
            for sigma in (0.0, sigma_t):
                pop = draw_users((size, users_per_arm), rng)
                impr, clicks = ab_outcomes(pop, sigma, rng)
                m.append(Moments.of(clicks, impr, cumulative=True).at(look_at))
            c, t = ratio(m[0]), ratio(m[1])
            delta, var = difference(t, c)
            tau2 = sequential.planned_tau2(var[:, :1] * m[1].n[:, :1], planned, alpha)
            low, high = sequential.confidence_sequence(delta, var, tau2, alpha)
            low, high = np.maximum.accumulate(low, axis=-1), np.minimum.accumulate(high, axis=-1)
            non_inferior = low > -margin * c[0]
            if "ni" in keys:
                hits["ni"] += int(np.sum(np.any(non_inferior, axis=-1)))
            else:
                hits["worse"] += int(np.sum(np.any(high < 0, axis=-1)))
                hits["power"] += int(np.sum(non_inferior[:, -1]))
    return NonInferiorityRates(experiments, users_per_arm, margin, hits["ni"] / experiments, hits["worse"] / experiments,
                               hits["power"] / experiments)


# --- the whole benchmark -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecisionBench:
    ramp: RampAA
    many: ManyVariantsAA
    interleaving: InterleavingAA
    srm: SrmContinuous
    decided: AsDecided
    guardrail: NonInferiorityRates

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        r, m, i, s, d, g = self.ramp, self.many, self.interleaving, self.srm, self.decided, self.guardrail
        e = r.sampling_error
        se = lambda rate, runs: np.sqrt(rate * (1 - rate) / runs)  # noqa: E731
        shares = " → ".join(f"{x:.0%}" for x in r.shares)
        return "\n".join([
            f"**A/A through a ramp** ({shares} treatment; {r.experiments:,} experiments × {r.users:,} users, equal numbers "
            f"entering in each revision, later users clicking ×{r.trend:.1f} as readily; a look every {r.look_every} users, "
            f"stopping at the first p < α). One binomial SE of α is ±{e:.4f}.",
            "",
            "| rule | false-positive rate | bound α + 3 SE |",
            "| --- | ---: | ---: |",
            f"| **decision**: one α over all revisions, strata by entry revision (mSPRT) | {r.one_alpha_stratified:.4f} | {r.alpha + 3 * e:.4f} |",
            f"| **decision with CUPED**: the same on the CUPED-adjusted difference | {r.one_alpha_stratified_cuped:.4f} | {r.alpha + 3 * e:.4f} |",
            f"| old rule: a fresh running minimum at every revision | {r.fresh_alpha_per_revision:.4f} | |",
            f"| one α but users pooled across revisions without strata | {r.one_alpha_pooled:.4f} | (Simpson: the trend meets the changing split) |",
            "",
            f"**Several variants** ({m.variants - 1} treatments against control, A/A, {m.experiments:,} experiments × {m.users_per_arm:,} "
            f"users per arm, peeked): any winner named with Holm over the always-valid p-values {m.holm_fwer:.4f} "
            f"(bound {ALPHA + 3 * se(ALPHA, m.experiments):.4f}); without correction {m.uncorrected_fwer:.4f}.",
            "",
            f"**Interleaving A/A under peeking** ({i.experiments:,} experiments, re-read after every vote from {i.first_vote} to "
            f"{i.votes:,}): exact sign test at one look {i.fixed_one_look:.4f}; sign test peeked {i.fixed_peeked:.4f}; "
            f"**always-valid beta-binomial mixture (the decision) peeked {i.always_valid_peeked:.4f}** "
            f"(bound {ALPHA + 3 * se(ALPHA, i.experiments):.4f}).",
            "",
            f"**SRM under continuous checking** ({s.experiments:,} true 50/50 experiments checked after every user from "
            f"{s.first_check} to {s.users:,}): χ² at p < 0.001 ever flagged {s.chi2_false_alarms:.4f}; "
            f"**sequential test (the flag) {s.sequential_false_alarms:.5f}** (promise ≤ 0.001); a planted "
            f"{s.planted_share:.0%}/{1 - s.planted_share:.0%} split flagged by {s.users:,} users: {s.sequential_detection:.3f}.",
            "",
            f"**Users needed as decided** (planted +10 % CTR; the sequential test read at 50 looks with τ tuned to the "
            f"planned size; power simulated in the full model over {d.experiments} experiments, SE ±{se(0.8, d.experiments):.3f}):",
            "",
            "| method (the rule that decides) | users for 80 % power | simulated power there |",
            "| --- | ---: | ---: |",
            f"| A/B, mSPRT on CTR | {d.ab:,} | {d.ab_power:.3f} |",
            f"| A/B, mSPRT on the CUPED-adjusted CTR | {d.ab_cuped:,} | {d.ab_cuped_power:.3f} |",
            f"| interleaving, beta-binomial mixture on per-user votes | {d.interleaving:,} | {d.interleaving_power:.3f} |",
            f"| (one-look Welch test, for comparison) | {d.fixed_horizon_ab:,} | |",
            "",
            f"The effect of τ: power at {d.ab:,} users when τ is tuned for another planned size — "
            + "; ".join(f"{k}: {v:.3f}" for k, v in d.tau_effect.items()) + ".",
            "",
            f"**Guardrails (non-inferiority, margin {g.margin:.0%})** on CTR, {g.experiments} experiments × {g.users_per_arm:,} users "
            f"per arm, 50 looks: treatment exactly {g.margin:.0%} worse declared non-inferior {g.false_non_inferior:.4f} "
            f"(must be ≤ α); A/A declared worse {g.false_worse:.4f} (≤ α); A/A shown non-inferior by the end {g.non_inferior_power:.3f}.",
        ])


    def ratios(self) -> str:
        r, i, s, d = self.ramp, self.interleaving, self.srm, self.decided
        return "\n".join([
            f"ramp A/A ÷ α: decision {r.one_alpha_stratified / r.alpha:.2f}×, with CUPED {r.one_alpha_stratified_cuped / r.alpha:.2f}×, "
            f"unstratified {r.one_alpha_pooled / r.alpha:.1f}×   interleaving peeked ÷ α: always-valid {i.always_valid_peeked / ALPHA:.2f}×, "
            f"sign test {i.fixed_peeked / ALPHA:.1f}×   SRM false alarms ÷ 0.001: sequential {s.sequential_false_alarms / 0.001:.2f}×, "
            f"χ² peeked {s.chi2_false_alarms / 0.001:.0f}×",
            f"users for 80 % power as decided: A/B {d.ab:,}, CUPED {d.ab_cuped:,} ({d.ab / d.ab_cuped:.2f}× fewer), "
            f"interleaving {d.interleaving:,} ({d.ab / d.interleaving:.0f}× fewer)",
        ])


def run_decision_bench(ramp_experiments: int = 1000, power_experiments: int = 400, seed: int = 40,
                       progress: Progress | None = None) -> DecisionBench:
    say = progress or (lambda _m: None)
    say("A/A through a ramp …")
    ramp = simulate_ramp_aa(ramp_experiments, seed=seed + 1, progress=progress)
    say("several variants …")
    many = simulate_many_variants_aa(ramp_experiments, seed=seed + 2)
    say("interleaving under peeking …")
    il = simulate_interleaving_aa(seed=seed + 3)
    say("SRM under continuous checking …")
    s = simulate_srm_continuous(seed=seed + 4)
    decided = as_decided(power_experiments, seed=seed + 5, progress=progress)
    say("guardrails …")
    g = simulate_non_inferiority(power_experiments, seed=seed + 6)
    return DecisionBench(ramp, many, il, s, decided, g)
