"""Proof by simulation: error rates, power and users needed (`vitrine bench stats`, the unit tests).

A small generative model of a recommender experiment, vectorised with numpy so that thousands of
experiments run in seconds, analysed by *the same functions* the report uses (estimators, cuped,
sequential, srm, interleaving):

- a user has an activity level ``a ~ Gamma(2, 1/2)`` (mean 1); it drives how often they come back
  (exposures ``1 + Poisson(3a)``), how many events they had before the experiment (the CUPED
  covariate, ``Poisson(10a)``) and how readily they click — so pre-period activity is correlated with
  the user's clicks, as in a real shop;
- each user has a pool of 20 candidate items with relevances ``Beta(1, 6)``; a ranker shows 8 of them,
  ordered by ``relevance + σ·noise`` — a better ranker has a smaller σ;
- a shown item is clicked with probability ``0.35 · a · relevance / log2(position + 2)`` (relevance ×
  position bias), independently per exposure.

The planted lift is exact by construction: ranker B orders by relevance (σ = 0) and ranker A's σ is
calibrated (bisection on the expected CTR, 200,000 users, common random numbers) so that
``E[CTR_B] / E[CTR_A] = 1.10``. Interleaving merges A's and B's lists for the same user by team draft
(a fresh coin per round and exposure) and credits each click to the slot's owner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Final

import numpy as np
from scipy import stats
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import proportion_effectsize

from vitrine.experiments import cuped, sequential
from vitrine.experiments.estimators import (
    ALPHA,
    Moments,
    binomial_ratio_variance,
    difference,
    fixed_horizon_p_value,
    ratio,
    welch_df,
)
from vitrine.experiments.interleaving import sign_test_p_values, user_votes
from vitrine.experiments.srm import SRM_THRESHOLD, srm_p_values

POOL: Final = 20
SLOTS: Final = 8
MAX_EXPOSURES: Final = 12
POSITION_BIAS: Final = 1 / np.log2(np.arange(SLOTS) + 2)
CHUNK_ELEMENTS: Final = 4_000_000
"""Experiments are simulated in chunks of about this many user × item values (memory ≈ 100 MB)."""


@dataclass(frozen=True)
class Users:
    """A batch of simulated users; leading axes are experiments, the last one users."""

    activity: np.ndarray
    exposures: np.ndarray
    pre_events: np.ndarray
    relevance: np.ndarray
    """(…, users, POOL)"""
    noise: np.ndarray
    """(…, users, POOL) standard-normal ranking noise (one draw per user and item: rankers are deterministic)."""


def draw_users(shape: tuple[int, ...], rng: np.random.Generator) -> Users:
    activity = rng.gamma(2.0, 0.5, size=shape)
    exposures = np.minimum(1 + rng.poisson(3.0 * activity), MAX_EXPOSURES)
    pre = rng.poisson(10.0 * activity)
    relevance = rng.beta(1.0, 6.0, size=(*shape, POOL))
    return Users(activity, exposures, pre, relevance, rng.standard_normal((*shape, POOL)))


def ranking(users: Users, sigma: float) -> np.ndarray:
    """Item indices best first, by ``relevance + σ·noise`` (…, users, POOL)."""
    return np.argsort(-(users.relevance + sigma * users.noise), axis=-1)


def click_probability(users: Users, items: np.ndarray, positions: np.ndarray | slice = slice(None)) -> np.ndarray:
    """P(click) of each shown item: ``0.35 · activity · relevance · position bias``, capped at 1."""
    rel = np.take_along_axis(users.relevance, items, axis=-1)
    return np.minimum(1.0, 0.35 * users.activity[..., None] * rel * POSITION_BIAS[positions])


def ab_outcomes(users: Users, sigma: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(impressions, clicks) per user when every answer is the ranker's top SLOTS."""
    q = click_probability(users, ranking(users, sigma)[..., :SLOTS])
    clicks = rng.binomial(users.exposures[..., None], q).sum(axis=-1)
    return users.exposures * SLOTS, clicks


def expected_ctr(users: Users, sigma: float) -> float:
    q = click_probability(users, ranking(users, sigma)[..., :SLOTS])
    return float(np.sum(users.exposures * q.sum(axis=-1)) / np.sum(users.exposures * SLOTS))


def calibrate(lift: float = 0.10, users: int = 200_000, seed: int = 7) -> tuple[float, float]:
    """σ of ranker A such that ranker B (σ = 0) has ``1 + lift`` times its expected CTR; returns (σ_A, achieved lift)."""
    pop = draw_users((users,), np.random.default_rng(seed))
    best = expected_ctr(pop, 0.0)
    lo, hi = 0.0, 2.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if best / expected_ctr(pop, mid) < 1 + lift else (lo, mid)
    sigma = (lo + hi) / 2
    return sigma, best / expected_ctr(pop, sigma) - 1


def team_draft(list_a: np.ndarray, list_b: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Team-draft interleaving of full rankings (rows, POOL) into SLOTS slots (Radlinski et al. 2008).

    The team with fewer picks chooses next, a coin decides ties (the same as a coin per round for who
    picks first); a team picks its best item not yet shown. Returns (items, owned_by_a), both (rows, SLOTS).
    """
    m = list_a.shape[0]
    rows = np.arange(m)
    used = np.zeros((m, POOL), dtype=bool)
    ptr = {True: np.zeros(m, dtype=int), False: np.zeros(m, dtype=int)}
    lists = {True: list_a, False: list_b}
    count_a, count_b = np.zeros(m, dtype=int), np.zeros(m, dtype=int)
    items = np.empty((m, SLOTS), dtype=int)
    owner_a = np.empty((m, SLOTS), dtype=bool)
    for slot in range(SLOTS):
        a_turn = (count_a < count_b) | ((count_a == count_b) & (rng.random(m) < 0.5))
        for team in (True, False):
            while True:
                taken = used[rows, lists[team][rows, ptr[team]]]
                if not taken.any():
                    break
                ptr[team][taken] += 1
        item = np.where(a_turn, list_a[rows, ptr[True]], list_b[rows, ptr[False]])
        used[rows, item] = True
        items[:, slot], owner_a[:, slot] = item, a_turn
        count_a += a_turn
        count_b += ~a_turn
    return items, owner_a


def interleaved_outcomes(users: Users, sigma_a: float, sigma_b: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(wins_a, wins_b) per user over their exposures, each exposure a fresh team draft."""
    shape = users.activity.shape
    la, lb = ranking(users, sigma_a).reshape(-1, POOL), ranking(users, sigma_b).reshape(-1, POOL)
    flat = Users(users.activity.reshape(-1), users.exposures.reshape(-1), users.pre_events.reshape(-1),
                 users.relevance.reshape(-1, POOL), users.noise.reshape(-1, POOL))
    wins_a = np.zeros(la.shape[0])
    wins_b = np.zeros(la.shape[0])
    for e in range(MAX_EXPOSURES):
        live = flat.exposures > e
        if not live.any():
            break
        items, owner_a = team_draft(la, lb, rng)
        clicks = rng.random(items.shape) < click_probability(flat, items)
        ca, cb = (clicks & owner_a).sum(axis=-1), (clicks & ~owner_a).sum(axis=-1)
        wins_a += live & (ca > cb)
        wins_b += live & (cb > ca)
    return wins_a.reshape(shape), wins_b.reshape(shape)


def _chunks(experiments: int, users: int, budget: int = CHUNK_ELEMENTS) -> list[int]:
    """Experiments per chunk so that one chunk holds about `budget` user × item values."""
    size = max(1, budget // (users * POOL))
    return [min(size, experiments - i) for i in range(0, experiments, size)]


# --- A/A: false positives, with and without peeking ----------------------------------------------


@dataclass(frozen=True)
class AAResult:
    experiments: int
    users_per_arm: int
    looks: int
    first_look: int
    alpha: float
    fixed_horizon: float
    """Rejection rate of the fixed-horizon Welch test (delta method) at the planned n."""
    binomial_naive: float
    """The same with the naive binomial variance of CTR (impressions as the unit)."""
    naive_peeking: float
    """Fixed-horizon test looked at after every user pair, stopped at the first p < α."""
    sequential_peeking: float
    """mSPRT looked at after every user pair."""
    sampling_error: float
    """One binomial standard error of a rate α over `experiments` runs: √(α(1−α)/R)."""


def simulate_aa(experiments: int = 1000, users_per_arm: int = 2000, first_look: int = 100, alpha: float = ALPHA,
                seed: int = 1, progress: Callable[[str], None] | None = None) -> AAResult:
    """A/A experiments (both arms the same ranker) on CTR; peeking after every user pair from `first_look`."""
    rng = np.random.default_rng(seed)
    counts = dict(fixed=0, binom=0, naive=0, seq=0)
    look_at = np.arange(first_look - 1, users_per_arm)
    for size in _chunks(experiments, users_per_arm):
        arms = [ab_outcomes(draw_users((size, users_per_arm), rng), 0.3, rng) for _ in range(2)]
        m = [Moments.of(clicks, impr, cumulative=True).at(look_at) for impr, clicks in arms]
        est_c, est_t = ratio(m[0]), ratio(m[1])
        delta, var = difference(est_t, est_c)
        p = fixed_horizon_p_value(delta, var, welch_df(est_t[1], m[1].n, est_c[1], m[0].n))
        counts["fixed"] += int(np.sum(p[:, -1] < alpha))
        counts["naive"] += int(np.sum(np.any(p < alpha, axis=-1)))
        bvar = binomial_ratio_variance(m[0]) + binomial_ratio_variance(m[1])
        counts["binom"] += int(np.sum(fixed_horizon_p_value(delta[:, -1], bvar[:, -1]) < alpha))
        tau2 = sequential.mixture_variance(var, m[1].n, users_per_arm, alpha)
        counts["seq"] += int(np.sum(sequential.rejects(delta, var, tau2, alpha)))
        if progress:
            progress(f"A/A {size} experiments")
    rate = {k: v / experiments for k, v in counts.items()}
    return AAResult(experiments, users_per_arm, len(look_at), first_look, alpha, rate["fixed"], rate["binom"],
                    rate["naive"], rate["seq"], float(np.sqrt(alpha * (1 - alpha) / experiments)))


# --- planted lift: power and users needed ---------------------------------------------------------


def power_ab(users_per_arm: int, experiments: int, sigma_a: float, sigma_b: float = 0.0, alpha: float = ALPHA,
             seed: int = 2) -> tuple[float, float]:
    """(power without CUPED, power with CUPED) of the Welch test on CTR, A (σ_a) vs B (σ_b)."""
    rng = np.random.default_rng(seed)
    hits = np.zeros(2)
    for size in _chunks(experiments, users_per_arm):
        moments = []
        for sigma in (sigma_a, sigma_b):
            users = draw_users((size, users_per_arm), rng)
            impr, clicks = ab_outcomes(users, sigma, rng)
            moments.append(Moments.of(clicks, impr, users.pre_events))
        est = [ratio(m) for m in moments]
        d, v = difference(est[1], est[0])
        hits[0] += np.sum(fixed_horizon_p_value(d, v, welch_df(est[1][1], moments[1].n, est[0][1], moments[0].n)) < alpha)
        _, adj = cuped.adjust_all(moments)
        d, v = difference(adj[1], adj[0])
        hits[1] += np.sum(fixed_horizon_p_value(d, v, welch_df(adj[1][1], moments[1].n, adj[0][1], moments[0].n)) < alpha)
    return float(hits[0] / experiments), float(hits[1] / experiments)


def power_interleaving(users: int, experiments: int, sigma_a: float, sigma_b: float = 0.0, alpha: float = ALPHA,
                       seed: int = 3) -> float:
    """Power of the per-user sign test of team-draft interleaving, A (σ_a) vs B (σ_b)."""
    rng = np.random.default_rng(seed)
    hits = 0
    for size in _chunks(experiments, users):
        wins_a, wins_b = interleaved_outcomes(draw_users((size, users), rng), sigma_a, sigma_b, rng)
        pa, pb = user_votes(wins_a, wins_b)
        hits += int(np.sum(sign_test_p_values(pa, pb) < alpha))
    return hits / experiments


@dataclass(frozen=True)
class UsersNeeded:
    """Users (both arms together) for 80 % power at α, from the model's per-user variances (large sample)."""

    ab: int
    ab_cuped: int
    interleaving: int
    cuped_variance_reduction: float
    preference_b: float
    """Share of voting users who prefer the better ranker."""
    voting_share: float
    """Share of users whose exposures give a preference (not a tie / no click)."""


def users_needed(sigma_a: float, sigma_b: float = 0.0, users: int = 100_000, alpha: float = ALPHA, power: float = 0.8,
                 seed: int = 4) -> UsersNeeded:
    """Sample sizes by the normal approximation (statsmodels `NormalIndPower`) from moments of a large sample.

    A/B: effect size ``Δ / √((V_A + V_B)/2)`` with the per-user (linearised) variances V, per arm, ×2.
    CUPED: the same with the adjusted variances. Interleaving: a one-sample test of the voting share
    p = 0.5 with Cohen's h (`proportion_effectsize`), divided by the share of users who vote.
    """
    rng = np.random.default_rng(seed)
    moments, pops = [], []
    for sigma in (sigma_a, sigma_b):
        pop = draw_users((users,), rng)
        impr, clicks = ab_outcomes(pop, sigma, rng)
        moments.append(Moments.of(clicks, impr, pop.pre_events))
        pops.append(pop)
    est = [ratio(m) for m in moments]
    delta = est[1][0] - est[0][0]
    solver = NormalIndPower()

    def per_arm(v_a: float, v_b: float) -> int:
        es = abs(delta) / np.sqrt((v_a + v_b) / 2)
        return int(np.ceil(solver.solve_power(effect_size=es, alpha=alpha, power=power, ratio=1.0)))

    plain = per_arm(est[0][1] * users, est[1][1] * users)
    _, adj = cuped.adjust_all(moments)
    cup = per_arm(adj[0][1] * users, adj[1][1] * users)
    reduction = float(cuped.variance_reduction(est[0][1] + est[1][1], adj[0][1] + adj[1][1]))
    wins_a, wins_b = interleaved_outcomes(pops[0], sigma_a, sigma_b, rng)
    pa, pb = (float(v) for v in user_votes(wins_a, wins_b))
    pref_b, voting = pb / (pa + pb), (pa + pb) / users
    votes = solver.solve_power(effect_size=abs(proportion_effectsize(pref_b, 0.5)), alpha=alpha, power=power, ratio=0.0)
    return UsersNeeded(2 * plain, 2 * cup, int(np.ceil(votes / voting)), reduction, pref_b, voting)


# --- SRM -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SrmSim:
    users: int
    experiments: int
    planted_share: float
    detection_rate: float
    """Share of experiments with a planted split flagged at p < 0.001."""
    false_alarm_rate: float
    """Share of true 50/50 experiments flagged."""
    users_for_80_percent: int
    """Users at which the planted split is flagged with probability 0.8 (noncentral χ²)."""


def simulate_srm(users: int = 20_000, experiments: int = 100_000, planted_share: float = 0.52, seed: int = 5) -> SrmSim:
    """Flag rate of a planted split against 50/50, and of a true 50/50 (false alarms), at `users` users."""
    rng = np.random.default_rng(seed)
    rates = []
    for share in (planted_share, 0.5):
        a = rng.binomial(users, share, size=experiments)
        p = srm_p_values(np.stack([a, users - a], axis=-1), np.array([1, 1]))
        rates.append(float(np.mean(p < SRM_THRESHOLD)))
    # noncentrality per user of Pearson's χ² with one degree of freedom: Σ (p_i − q_i)² / q_i
    per_user = 2 * (planted_share - 0.5) ** 2 / 0.5
    crit = stats.chi2.isf(SRM_THRESHOLD, 1)
    lo, hi = 1, 10_000_000
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if stats.ncx2.sf(crit, 1, mid * per_user) >= 0.8 else (mid + 1, hi)
    return SrmSim(users, experiments, planted_share, rates[0], rates[1], lo)


# --- the whole benchmark ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StatsBench:
    aa: AAResult
    sigma_a: float
    planted_lift: float
    needed: UsersNeeded
    power_experiments: int
    power_at_needed: dict[str, float]
    """Simulated power of each method at its own users-needed figure (should be ≈ 0.80)."""
    common_users: int
    power_at_common: dict[str, float]
    """Simulated power of each method at the same number of users."""
    srm: SrmSim

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self, command: str) -> str:
        a, n, s = self.aa, self.needed, self.srm
        e = a.sampling_error
        pe = np.sqrt(0.8 * 0.2 / self.power_experiments)
        lines = [
            f"Reproduce: `{command}` (seeded; {a.experiments:,} A/A experiments, {self.power_experiments:,} per power figure).",
            "",
            f"**A/A** — {a.experiments:,} experiments × {a.users_per_arm:,} users per arm, CTR, α = {a.alpha}; "
            f"one binomial standard error of a rate α is ±{e:.4f}. Peeking: a look after every user pair from "
            f"{a.first_look} per arm ({a.looks:,} looks), stopping at the first p < α.",
            "",
            "| test | false-positive rate | expected |",
            "| --- | ---: | --- |",
            f"| fixed horizon (Welch, delta-method variance), one look | {a.fixed_horizon:.4f} | α ± 3 SE = [{a.alpha - 3 * e:.4f}, {a.alpha + 3 * e:.4f}] |",
            f"| the same with the naive binomial variance of CTR | {a.binomial_naive:.4f} | (why the delta method: users, not impressions, are the unit) |",
            f"| fixed-horizon test peeked at every look | {a.naive_peeking:.4f} | exceeds α: {a.naive_peeking / a.alpha:.1f}× α |",
            f"| mSPRT (always-valid) peeked at every look | {a.sequential_peeking:.4f} | ≤ α + 3 SE = {a.alpha + 3 * e:.4f} |",
            "",
            f"**Planted +{self.planted_lift:.1%} CTR** (ranker B orders by relevance, ranker A with noise σ = {self.sigma_a:.3f}; "
            f"calibrated on 200,000 users). Users needed are for both arms together (interleaving: every user sees both); "
            f"simulated power has a standard error of ±{pe:.3f} around 0.80.",
            "",
            f"| method | users for 80 % power | simulated power there | power at {self.common_users:,} users | users vs A/B |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| A/B, Welch on CTR (delta method) | {n.ab:,} | {self.power_at_needed['ab']:.3f} | {self.power_at_common['ab']:.3f} | 1× |",
            f"| A/B with CUPED (pre-period events; variance −{n.cuped_variance_reduction:.0%}) | {n.ab_cuped:,} | {self.power_at_needed['ab_cuped']:.3f} | {self.power_at_common['ab_cuped']:.3f} | {n.ab / n.ab_cuped:.1f}× fewer |",
            f"| team-draft interleaving, per-user sign test ({n.preference_b:.1%} of voting users prefer B; {n.voting_share:.0%} vote) | {n.interleaving:,} | {self.power_at_needed['interleaving']:.3f} | {self.power_at_common['interleaving']:.3f} | {n.ab / n.interleaving:.0f}× fewer |",
            "",
            f"**SRM** — {s.experiments:,} simulated experiments of {s.users:,} users, configured 50/50, flagged at p < {SRM_THRESHOLD}:",
            "",
            "| split | flagged |",
            "| --- | ---: |",
            f"| planted {s.planted_share:.0%}/{1 - s.planted_share:.0%} | {s.detection_rate:.4f} |",
            f"| true 50/50 (false alarms; expected {SRM_THRESHOLD}) | {s.false_alarm_rate:.5f} |",
            "",
            f"A planted {s.planted_share:.0%}/{1 - s.planted_share:.0%} split is flagged with probability 0.8 from {s.users_for_80_percent:,} users (noncentral χ²).",
        ]
        return "\n".join(lines)

    def ratios(self) -> str:
        n, a = self.needed, self.aa
        return "\n".join([
            f"naive peeking ÷ α: {a.naive_peeking / a.alpha:.1f}×   mSPRT peeking ÷ α: {a.sequential_peeking / a.alpha:.2f}×   fixed horizon ÷ α: {a.fixed_horizon / a.alpha:.2f}×",
            f"users for 80 % power, A/B ÷ A/B+CUPED: {n.ab / n.ab_cuped:.2f}×   A/B ÷ interleaving: {n.ab / n.interleaving:.0f}×",
        ])


def run_bench(aa_experiments: int = 2000, aa_users_per_arm: int = 2000, power_experiments: int = 400,
              srm_users: int = 20_000, seed: int = 11, progress: Callable[[str], None] | None = None) -> StatsBench:
    """Everything `vitrine bench stats` prints and writes to docs/experiments.md."""
    say = progress or (lambda _msg: None)
    say("A/A …")
    aa = simulate_aa(aa_experiments, aa_users_per_arm, seed=seed)
    say("calibrating the planted +10 % CTR …")
    sigma_a, lift = calibrate()
    say("users needed …")
    need = users_needed(sigma_a, seed=seed + 1)
    say("power at the users needed …")
    ab, _ = power_ab(need.ab // 2, power_experiments, sigma_a, seed=seed + 2)
    _, ab_c = power_ab(need.ab_cuped // 2, power_experiments, sigma_a, seed=seed + 3)
    il = power_interleaving(need.interleaving, power_experiments, sigma_a, seed=seed + 4)
    common = int(round(need.ab_cuped, -3)) or 1000
    say(f"power at {common:,} users …")
    c_ab, c_abc = power_ab(common // 2, power_experiments, sigma_a, seed=seed + 5)
    c_il = power_interleaving(common, min(power_experiments, 200), sigma_a, seed=seed + 6)
    say("SRM …")
    s = simulate_srm(srm_users, seed=seed + 7)
    return StatsBench(aa, sigma_a, lift, need, power_experiments, {"ab": ab, "ab_cuped": ab_c, "interleaving": il},
                      common, {"ab": c_ab, "ab_cuped": c_abc, "interleaving": c_il}, s)
