"""One look at an experiment: per-user outcome rows → estimates, tests and this look's evidence.

`analyse(rows, weights, control, ...)` returns a tree of frozen dataclasses (`ExperimentAnalysis`) that
`vitrine ab report` prints as a table or JSON. It is one *look*: the always-valid p-value and confidence
sequence it gives are this look's; `vitrine.experiments.decision` keeps their running minimum and
intersection across looks and revisions (one α per experiment), corrects for multiple comparisons and
says who wins.

**Revisions are strata.** A ramp (10 % → 50 %) changes the split while users keep their buckets, so users
who entered under each revision were randomised with other weights; pooling them naively mixes the
arms' shares with whatever changed over time (Simpson's paradox). `vitrine.experiments.revisions` pools a
user's rows across the revisions of one hypothesis and labels each user with the revision she entered in;
here each stratum is compared within itself and the strata are combined by inverse variance,

    Δ̂ = Σ_s Δ̂_s / V_s  /  Σ_s 1 / V_s,      Var(Δ̂) = 1 / Σ_s 1 / V_s,

(the fixed-effect combination, e.g. Hartung, Knapp & Sinha, "Statistical Meta-Analysis with
Applications", 2008, §4.1). Its score Δ̂ / Var(Δ̂) = Σ_s Δ̂_s / V_s is a sum of the strata's score
processes, so in information time it is again the random walk the mSPRT needs: the one sequential test
spans every revision. With one stratum everything reduces to the plain two-sample comparison.

**The decision uses CUPED when it can.** The sequential test runs on the CUPED-adjusted difference when a
pre-exposure covariate exists for the experiment (`revisions.pool` says when it does not, and why).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Final

import numpy as np
from statsmodels.stats.proportion import proportion_confint

from vitrine.contracts.outcomes import ANALYSED_METRICS, UserOutcome
from vitrine.experiments import cuped, sequential, srm
from vitrine.experiments.estimators import (
    ALPHA,
    Moments,
    difference,
    fixed_horizon_p_value,
    normal_interval,
    ratio,
    relative_difference,
    welch_df,
)

DEFAULT_PLANNED_USERS: Final = 10_000
"""Users per variant at which the sequential test is tuned to be most sensitive (see `sequential`);
`outcomes.planned_users_per_variant` in the settings."""


@dataclass(frozen=True)
class MetricDef:
    """A metric as a ratio of per-user sums: Σ numerator / Σ denominator (denominator None → per-user mean)."""

    name: str
    label: str
    numerator: Callable[[dict[str, np.ndarray]], np.ndarray]
    denominator: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None


METRICS: Final = (
    MetricDef("impressions_per_user", "impressions / user", lambda c: c["impressions"]),
    MetricDef("ctr", "CTR (clicks / impressions)", lambda c: c["clicks"], lambda c: c["impressions"]),
    MetricDef("conversion", "conversion (≥1 purchase)", lambda c: (c["purchases"] > 0).astype(float)),
    MetricDef("purchases_per_user", "purchases / user", lambda c: c["purchases"]),
)
assert tuple(m.name for m in METRICS) == ANALYSED_METRICS, "the contract names the metrics analysed here"


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided 1 − α interval."""

    estimate: float
    low: float
    high: float

    @classmethod
    def normal(cls, estimate: float, variance: float, alpha: float = ALPHA) -> Interval:
        low, high = normal_interval(estimate, variance, alpha)
        return cls(float(estimate), float(low), float(high))

    def fmt(self, pct: bool = False, digits: int = 4) -> str:
        if pct:
            return f"{self.estimate:+.2%} [{self.low:+.2%}, {self.high:+.2%}]"
        return f"{self.estimate:.{digits}g} [{self.low:.{digits}g}, {self.high:.{digits}g}]"


@dataclass(frozen=True)
class VariantSummary:
    variant: str
    users: int
    share: Interval
    """Share of all users (Wilson interval, statsmodels), to read beside the SRM check."""
    metrics: dict[str, Interval]


@dataclass(frozen=True)
class SequentialResult:
    """mSPRT on the decision's absolute difference at this look: p-value and confidence sequence.

    Valid at any look; the decision takes the running minimum / intersection over all looks."""

    p_value: float
    low: float
    high: float
    tau2: float
    planned_users: int
    estimator: str
    """"cuped" (the CUPED-adjusted difference) or "plain"."""
    estimate: float
    """The difference the test is about (stratified; CUPED-adjusted when `estimator` is "cuped")."""
    variance: float
    significant: bool


@dataclass(frozen=True)
class CupedResult:
    theta: float
    control: Interval
    variant: Interval
    absolute: Interval
    relative: Interval
    p_value: float
    variance_reduction: float
    """1 − Var(lift with CUPED) / Var(lift without)."""


@dataclass(frozen=True)
class Comparison:
    """One metric of one variant against control."""

    variant: str
    metric: str
    absolute: Interval
    relative: Interval
    p_value: float
    """Fixed-horizon test (valid for one look at a pre-planned sample size; descriptive here)."""
    significant: bool
    sequential: SequentialResult
    cuped: CupedResult | None = None
    control_estimate: float = float("nan")
    """Control's (stratified) value of the metric: turns a relative non-inferiority margin into an absolute one."""


@dataclass(frozen=True)
class ExperimentAnalysis:
    control: str
    alpha: float
    users: int
    weights: dict[str, int]
    srm: srm.SrmResult
    variants: list[VariantSummary]
    comparisons: list[Comparison]
    covariate_used: bool
    notes: list[str] = field(default_factory=list)
    strata: list[int] = field(default_factory=list)
    """The revisions whose entering users are compared (one per stratum)."""

    def to_dict(self) -> dict:
        """Plain JSON-able dict (floats, strings, lists)."""
        return asdict(self)

    def table(self) -> str:
        """A plain-text report: variants, then each comparison, then SRM."""
        labels = {m.name: m.label for m in METRICS}
        lines = [f"{'variant':<14}{'users':>9}  {'share':<26}" + "".join(f"{labels[m.name]:<36}" for m in METRICS)]
        for v in self.variants:
            lines.append(f"{v.variant:<14}{v.users:>9}  {v.share.fmt():<26}" + "".join(f"{v.metrics[m.name].fmt():<36}" for m in METRICS))
        lines.append("")
        lines.append(f"{'vs ' + self.control:<14}{'metric':<28}{'relative lift (95%)':<34}{'p fixed':>9}{'p this look':>13}"
                     + ("  CUPED relative lift, p, variance reduction" if self.covariate_used else ""))
        for c in self.comparisons:
            row = (f"{c.variant:<14}{labels[c.metric]:<28}{c.relative.fmt(pct=True):<34}{c.p_value:>9.4f}{c.sequential.p_value:>13.4f}")
            if c.cuped is not None:
                row += f"  {c.cuped.relative.fmt(pct=True)}, p={c.cuped.p_value:.4f}, −{c.cuped.variance_reduction:.0%} var"
            lines.append(row)
        lines.append("")
        flag = "MISMATCH" if self.srm.flagged else "ok"
        lines.append(f"sample ratio: always-valid p={self.srm.p_value:.4g} (χ²={self.srm.chi2:.2f}, one-look p={self.srm.chi2_p_value:.4g}) "
                     f"→ {flag} {self.srm.reason}".rstrip())
        if len(self.strata) > 1:
            lines.append(f"revisions pooled as strata (users by the revision they entered in): {', '.join(map(str, self.strata))}")
        lines += self.notes
        return "\n".join(lines)


def columns(rows: Sequence[UserOutcome]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The variant of each row and the per-user counts as numpy arrays (row order kept)."""
    variants = np.array([r.variant for r in rows], dtype=object)
    names = ("exposures", "impressions", "clicks", "add_to_carts", "purchases", "pre_events")
    return variants, {n: np.array([getattr(r, n) for r in rows], dtype=float) for n in names}


Estimate = tuple[np.ndarray, np.ndarray]
"""(estimate, variance of the estimate)."""


def combine(per_stratum: Sequence[tuple[Estimate, Estimate]]) -> tuple[Estimate, Estimate]:
    """Inverse-variance combination of (treatment, control) estimates over strata, with one weight per
    stratum ``w_s ∝ 1 / (V_t,s + V_c,s)`` for both arms, so that their difference is the fixed-effect Δ̂."""
    inv = np.array([1.0 / max(float(t[1] + c[1]), 1e-300) for t, c in per_stratum])
    w = inv / inv.sum()
    t = (sum(w_s * t[0] for w_s, (t, _) in zip(w, per_stratum, strict=True)),
         sum(w_s**2 * t[1] for w_s, (t, _) in zip(w, per_stratum, strict=True)))
    c = (sum(w_s * c[0] for w_s, (_, c) in zip(w, per_stratum, strict=True)),
         sum(w_s**2 * c[1] for w_s, (_, c) in zip(w, per_stratum, strict=True)))
    return t, c


def analyse(rows: list[UserOutcome], weights: Mapping[str, int], control: str, covariate: bool = True, *,
            strata: Sequence[int] | None = None, stratum_weights: Mapping[int, Mapping[str, int]] | None = None,
            covariate_refused: str = "", alpha: float = ALPHA, planned_users: int = DEFAULT_PLANNED_USERS,
            tau2: Mapping[str, float] | None = None, metrics: Sequence[MetricDef] = METRICS) -> ExperimentAnalysis:
    """One look at an experiment.

    rows: one per user (pooled over revisions by `revisions.pool` when there are several).
    weights: the current split (variant → weight), for the shares shown.
    control: the variant the others are compared with.
    covariate: apply CUPED with `pre_events` (events before the user's first exposure in the experiment)
        when any user has some and `covariate_refused` is empty (else that reason is noted).
    strata: the revision each row's user entered in (None: one stratum); `stratum_weights` gives each
        revision's split (for the SRM test; default: `weights` for every stratum).
    planned_users: users per variant the sequential test is tuned for (τ), unless `tau2` fixes τ² per
        "variant:metric" (the decision keeps the first look's τ² for the whole experiment).
    """
    if not rows:
        raise ValueError("no outcome rows")
    labels, cols = columns(rows)
    stratum = np.zeros(len(rows), dtype=int) if strata is None else np.asarray(strata, dtype=int)
    if stratum.shape != labels.shape:
        raise ValueError(f"{len(stratum)} strata for {len(rows)} rows")
    present = sorted(set(labels.tolist()))
    if control not in present:
        raise ValueError(f"control {control!r} has no users (variants: {', '.join(present)})")
    order = [control] + [v for v in sorted(set(present) | {v for v, w in weights.items() if w > 0}) if v != control]
    users = {v: int(np.sum(labels == v)) for v in order}
    strata_ids = sorted(set(stratum.tolist()))
    split = {s: dict(stratum_weights[s]) if stratum_weights is not None else dict(weights) for s in strata_ids}
    check = srm.check_strata([({v: int(np.sum((labels == v) & (stratum == s))) for v in present}, split[s]) for s in strata_ids])
    notes: list[str] = []
    z = cols["pre_events"]
    use_cov = covariate and not covariate_refused and bool(np.any(z > 0))
    if covariate and covariate_refused:
        notes.append(f"CUPED off: {covariate_refused}")
    elif covariate and not use_cov:
        notes.append("CUPED off: no user has events before her first exposure in the experiment.")
    total = len(rows)
    masks = {(s, v): (labels == v) & (stratum == s) for s in strata_ids for v in order}

    summaries = []
    for v in order:
        low, high = proportion_confint(users[v], total, alpha=alpha, method="wilson")
        summaries.append(VariantSummary(v, users[v], Interval(users[v] / total, float(low), float(high)), {}))
    comparisons: list[Comparison] = []
    for metric in metrics:
        y = metric.numerator(cols)
        x = None if metric.denominator is None else metric.denominator(cols)
        pooled = {v: Moments.of(y, x, mask=labels == v) for v in order if users[v] >= 2}
        for s in summaries:
            s.metrics[metric.name] = Interval.normal(*ratio(pooled[s.variant]), alpha) if s.variant in pooled else Interval(*[float("nan")] * 3)
        cells = {key: Moments.of(y, x, z if use_cov else None, mask=m) for key, m in masks.items() if np.sum(m) >= 2}
        plain = {key: ratio(m) for key, m in cells.items()}
        adjusted: dict[tuple[int, str], Estimate] = {}
        theta = np.nan
        if use_cov and len(cells) >= 2:
            theta = cuped.theta(list(cells.values()))
            for s in strata_ids:
                in_s = [key for key in cells if key[0] == s]
                z_mean = sum(cells[k].sz for k in in_s) / sum(cells[k].n for k in in_s)
                adjusted |= {k: cuped.adjusted(cells[k], theta, z_mean) for k in in_s}
        for v in order[1:]:
            both = [s for s in strata_ids if (s, v) in cells and (s, control) in cells]
            if not both:
                continue
            t, c = combine([(plain[(s, v)], plain[(s, control)]) for s in both])
            abs_, rel = difference(t, c), relative_difference(t, c)
            df = welch_df(t[1], pooled[v].n, c[1], pooled[control].n) if len(both) == 1 else None
            p = float(fixed_horizon_p_value(*abs_, df))
            cup = None
            decision = abs_
            if adjusted:
                at, ac = combine([(adjusted[(s, v)], adjusted[(s, control)]) for s in both])
                a_abs, a_rel = difference(at, ac), relative_difference(at, ac)
                cup = CupedResult(float(theta), Interval.normal(*ac, alpha), Interval.normal(*at, alpha),
                                  Interval.normal(*a_abs, alpha), Interval.normal(*a_rel, alpha),
                                  float(fixed_horizon_p_value(*a_abs)), float(cuped.variance_reduction(abs_[1], a_abs[1])))
                decision = a_abs
            key = f"{v}:{metric.name}"
            seq = _sequential(decision, users[v], planned_users, (tau2 or {}).get(key), "cuped" if cup else "plain", alpha)
            comparisons.append(Comparison(v, metric.name, Interval.normal(*abs_, alpha), Interval.normal(*rel, alpha),
                                          p, p < alpha, seq, cup, float(c[0])))
    return ExperimentAnalysis(control, alpha, total, dict(weights), check, summaries, comparisons, use_cov, notes, strata_ids)


def _sequential(decision: Estimate, users_now: int, planned_users: int, tau2: float | None, estimator: str,
                alpha: float) -> SequentialResult:
    """mSPRT at this look on the decision's difference; τ² from the planned users unless fixed earlier."""
    delta, var = (float(v) for v in decision)
    if tau2 is None:
        tau2 = float(sequential.planned_tau2(var * users_now, planned_users, alpha))
    ok = np.isfinite(var) and var > 0 and tau2 > 0
    if not ok:
        return SequentialResult(1.0, -np.inf, np.inf, tau2, planned_users, estimator, delta, var, False)
    p = float(sequential.p_value(delta, var, tau2))
    low, high = sequential.confidence_sequence(delta, var, tau2, alpha)
    return SequentialResult(p, float(low), float(high), tau2, planned_users, estimator, delta, var, p < alpha)
