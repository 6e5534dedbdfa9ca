"""Team-draft interleaving: which of two rankers do users prefer?

Both rankers answer the same request; their lists are merged by team draft (Radlinski, Kurup,
Joachims, "How Does Clickthrough Data Reflect Retrieval Quality?", CIKM 2008): in each round a coin
decides which team picks first, and each team adds its highest-ranked item not yet shown. A click is
credited to the team that owns the slot; an exposure is a *win* for the team with more credited
clicks (Chapelle, Joachims, Radlinski, Yue, "Large-scale validation and analysis of interleaved
search evaluation", ACM TOIS 2012). Because every user sees both rankers, the large differences
between users cancel — the reason interleaving needs far fewer users than an A/B test.

**The unit is the user, not the exposure.** One heavy user contributes many exposures whose verdicts
are correlated, so a binomial test over exposures would be overconfident. Each user therefore casts
one vote: A if the user's exposures gave A more wins than B (``wins_a > wins_b``), B if fewer, none
on a tie. The *preference share* of A is ``users voting A / (users voting A + users voting B)`` — the
per-user version of ``wins_a / (wins_a + wins_b)`` — and under H0 (no preference) each vote is a fair
coin: an exact two-sided binomial (sign) test, `scipy.stats.binomtest`, with its Clopper–Pearson
interval. The exposure-weighted share ``Σ wins_a / Σ (wins_a + wins_b)`` is reported beside it,
with a delta-method interval over users (it weights heavy users more; a descriptive figure).

**The verdict uses an always-valid test.** The monitor re-reads the votes every few seconds; the exact
sign test re-read after every vote from 10 to 1,000 names a winner in an A/A about 4 times in 10. The
decision therefore uses the beta-binomial mixture (`sequential.share_p_value`, Robbins 1970) on the same
votes, tuned to a planned number of voting users, whose running minimum is valid at every look; the sign
test stays in the report as the one-look figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from vitrine.contracts.outcomes import InterleavedOutcome
from vitrine.experiments import sequential
from vitrine.experiments.estimators import ALPHA, Moments, normal_interval, ratio


@dataclass(frozen=True)
class InterleavingResult:
    """Preference of team A over team B, per user, with a sign test."""

    team_a: str
    team_b: str
    users: int
    users_prefer_a: int
    users_prefer_b: int
    users_tied: int
    preference_a: float
    """users preferring A / users with a preference (0.5 = no preference)."""
    preference_low: float
    preference_high: float
    p_value: float
    exposure_share_a: float
    """Σ wins_a / Σ (wins_a + wins_b) over all users (exposure-weighted, descriptive)."""
    exposure_share_low: float
    exposure_share_high: float
    winner: str | None
    """The preferred team when this look's always-valid p < α, else None (`decision` uses the running minimum)."""
    sequential_p: float = 1.0
    """Always-valid p-value of "no preference" at this look (beta-binomial mixture)."""
    sequential_low: float = 0.0
    sequential_high: float = 1.0
    """Confidence sequence of the share preferring A at this look."""
    prior_a: float = 0.5


def sign_test(prefer_a: int, prefer_b: int, alpha: float = ALPHA) -> tuple[float, float, float, float]:
    """(share of A, low, high, p) from the exact binomial test of ``share = 0.5`` (scipy.stats.binomtest)."""
    n = prefer_a + prefer_b
    if n == 0:
        return 0.5, 0.0, 1.0, 1.0
    test = stats.binomtest(prefer_a, n, 0.5)
    ci = test.proportion_ci(confidence_level=1 - alpha, method="exact")
    return prefer_a / n, float(ci.low), float(ci.high), float(test.pvalue)


def user_votes(wins_a: np.ndarray, wins_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-user votes (last axis = users): counts of users preferring A and preferring B."""
    return np.sum(wins_a > wins_b, axis=-1), np.sum(wins_b > wins_a, axis=-1)


def sign_test_p_values(prefer_a: np.ndarray, prefer_b: np.ndarray) -> np.ndarray:
    """Vectorised two-sided sign-test p-values (exact binomial, the same as `binomtest`)."""
    n = prefer_a + prefer_b
    k = np.minimum(prefer_a, prefer_b)
    return np.minimum(1.0, 2 * stats.binom.cdf(k, n, 0.5))


DEFAULT_PLANNED_VOTES = 2000
"""Voting users the always-valid test is tuned for (`outcomes.planned_votes` in the settings)."""


def analyse_interleaving(rows: Sequence[InterleavedOutcome], alpha: float = ALPHA,
                         planned_votes: int = DEFAULT_PLANNED_VOTES) -> InterleavingResult:
    """Preference share of team A with its sign test and its always-valid test; rows whose teams are swapped
    are turned round."""
    if not rows:
        raise ValueError("no interleaved outcomes")
    team_a, team_b = rows[0].team_a, rows[0].team_b
    wins_a, wins_b = [], []
    for row in rows:
        if (row.team_a, row.team_b) == (team_a, team_b):
            wins_a.append(row.wins_a), wins_b.append(row.wins_b)
        elif (row.team_a, row.team_b) == (team_b, team_a):
            wins_a.append(row.wins_b), wins_b.append(row.wins_a)
        else:
            raise ValueError(f"user {row.user_id}: teams {row.team_a}/{row.team_b}, expected {team_a}/{team_b}")
    a, b = np.asarray(wins_a, dtype=float), np.asarray(wins_b, dtype=float)
    prefer_a, prefer_b = (int(v) for v in user_votes(a, b))
    share, low, high, p = sign_test(prefer_a, prefer_b, alpha)
    decided = (a + b) > 0
    if decided.sum() >= 2:
        est, var = ratio(Moments.of(a[decided], (a + b)[decided]))
        elow, ehigh = normal_interval(est, var, alpha)
    else:
        est, elow, ehigh = np.float64(0.5), np.float64(0.0), np.float64(1.0)
    prior = sequential.beta_prior_for(planned_votes, alpha)
    votes = prefer_a + prefer_b
    seq_p = float(sequential.share_p_value(prefer_a, votes, prior))
    seq_low, seq_high = sequential.share_confidence_sequence(prefer_a, votes, prior, alpha)
    winner = (team_a if share > 0.5 else team_b) if seq_p < alpha else None
    return InterleavingResult(team_a, team_b, len(rows), prefer_a, prefer_b, len(rows) - prefer_a - prefer_b,
                              share, low, high, p, float(est), float(elow), float(ehigh), winner, seq_p, seq_low, seq_high, prior)
