"""One entry point from per-user outcome rows to a decision: `analyse(rows, weights, control, ...)`.

The result is a tree of frozen dataclasses (`ExperimentAnalysis`) that `vitrine ab report` prints as
a table (`ExperimentAnalysis.table()`) or JSON (`to_dict()`). Nothing is kept between calls: the
sequential test is recomputed from the rows at every look (rows are in arrival order; `looks` names
the row counts at which someone looked), so a report may be asked for as often as anyone likes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Final

import numpy as np
from statsmodels.stats.proportion import proportion_confint

from vitrine.contracts.outcomes import UserOutcome
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

DEFAULT_HORIZON_USERS: Final = 10_000
"""Users per variant at which the sequential test is tuned to be most sensitive (see `sequential`)."""


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
    """mSPRT on the absolute difference: always-valid p-value and confidence sequence at the last look."""

    p_value: float
    low: float
    high: float
    looks: int
    horizon_users: int
    tau: float
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
    """Fixed-horizon Welch test (valid for one look at a pre-planned sample size)."""
    significant: bool
    sequential: SequentialResult
    cuped: CupedResult | None = None


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
        lines.append(f"{'vs ' + self.control:<14}{'metric':<28}{'relative lift (95%)':<34}{'p fixed':>9}{'p always-valid':>16}"
                     + ("  CUPED relative lift, p, variance reduction" if self.covariate_used else ""))
        for c in self.comparisons:
            row = (f"{c.variant:<14}{labels[c.metric]:<28}{c.relative.fmt(pct=True):<34}{c.p_value:>9.4f}{c.sequential.p_value:>16.4f}")
            if c.cuped is not None:
                row += f"  {c.cuped.relative.fmt(pct=True)}, p={c.cuped.p_value:.4f}, −{c.cuped.variance_reduction:.0%} var"
            lines.append(row)
        lines.append("")
        flag = "MISMATCH" if self.srm.flagged else "ok"
        lines.append(f"sample ratio: χ²={self.srm.chi2:.2f} p={self.srm.p_value:.4g} → {flag} {self.srm.reason}".rstrip())
        lines += self.notes
        return "\n".join(lines)


def columns(rows: Sequence[UserOutcome]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The variant of each row and the per-user counts as numpy arrays (row order kept)."""
    variants = np.array([r.variant for r in rows], dtype=object)
    names = ("exposures", "impressions", "clicks", "add_to_carts", "purchases", "pre_events")
    return variants, {n: np.array([getattr(r, n) for r in rows], dtype=float) for n in names}


def analyse(rows: list[UserOutcome], weights: dict[str, int], control: str, covariate: bool = True,
            looks: Sequence[int] | None = None, *, alpha: float = ALPHA,
            horizon_users: int = DEFAULT_HORIZON_USERS, metrics: Sequence[MetricDef] = METRICS) -> ExperimentAnalysis:
    """Analyse one experiment revision.

    rows: one per user, in arrival order (the order decides what each look saw).
    weights: the configured split (variant → weight), for the SRM check.
    control: the variant the others are compared with.
    covariate: apply CUPED with `pre_events` when any user has some.
    looks: cumulative row counts at which the results were looked at before now; the always-valid
        p-value is the minimum over these looks and now, the confidence sequence their intersection.
        None: only now (still valid: the mSPRT's p-value is valid at any stopping time).
    horizon_users: users per variant where the sequential test should be most sensitive.
    """
    if not rows:
        raise ValueError("no outcome rows")
    labels, cols = columns(rows)
    present = sorted(set(labels.tolist()))
    if control not in present:
        raise ValueError(f"control {control!r} has no users (variants: {', '.join(present)})")
    order = [control] + [v for v in sorted(set(present) | {v for v, w in weights.items() if w > 0}) if v != control]
    users = {v: int(np.sum(labels == v)) for v in order}
    notes: list[str] = []
    check = srm.check(users, weights)
    z = cols["pre_events"]
    use_cov = covariate and bool(np.any(z > 0))
    if covariate and not use_cov:
        notes.append("CUPED skipped: no pre-experiment events for any user.")
    total = len(rows)
    look_idx = sorted({min(max(int(k), 1), total) for k in (looks or ())} | {total})
    masks = {v: labels == v for v in order}

    summaries = []
    for v in order:
        low, high = proportion_confint(users[v], total, alpha=alpha, method="wilson")
        summaries.append(VariantSummary(v, users[v], Interval(users[v] / total, float(low), float(high)), {}))
    comparisons: list[Comparison] = []
    for metric in metrics:
        y = metric.numerator(cols)
        x = None if metric.denominator is None else metric.denominator(cols)
        moments = {v: Moments.of(y, x, z if use_cov else None, mask=masks[v]) for v in order if users[v] >= 2}
        est = {v: ratio(m) for v, m in moments.items()}
        for s in summaries:
            if s.variant in est:
                s.metrics[metric.name] = Interval.normal(*est[s.variant], alpha)
            else:
                s.metrics[metric.name] = Interval(float("nan"), float("nan"), float("nan"))
        adjusted = {}
        theta = np.nan
        if use_cov and len(moments) >= 2:
            theta, adj = cuped.adjust_all(list(moments.values()))
            adjusted = dict(zip(moments, adj, strict=True))
        for v in order[1:]:
            if v not in est or control not in est:
                continue
            abs_ = difference(est[v], est[control])
            rel = relative_difference(est[v], est[control])
            df = welch_df(est[v][1], moments[v].n, est[control][1], moments[control].n)
            p = float(fixed_horizon_p_value(*abs_, df))
            seq = _sequential(y, x, masks[v], masks[control], look_idx, abs_[1], users[v], horizon_users, alpha)
            cup = None
            if adjusted:
                a_abs = difference(adjusted[v], adjusted[control])
                a_rel = relative_difference(adjusted[v], adjusted[control])
                a_df = welch_df(adjusted[v][1], moments[v].n, adjusted[control][1], moments[control].n)
                cup = CupedResult(float(theta), Interval.normal(*adjusted[control], alpha), Interval.normal(*adjusted[v], alpha),
                                  Interval.normal(*a_abs, alpha), Interval.normal(*a_rel, alpha),
                                  float(fixed_horizon_p_value(*a_abs, a_df)), float(cuped.variance_reduction(abs_[1], a_abs[1])))
            comparisons.append(Comparison(v, metric.name, Interval.normal(*abs_, alpha), Interval.normal(*rel, alpha),
                                          p, p < alpha, seq, cup))
    return ExperimentAnalysis(control, alpha, total, dict(weights), check, summaries, comparisons, use_cov, notes)


def _sequential(y: np.ndarray, x: np.ndarray | None, in_t: np.ndarray, in_c: np.ndarray, look_idx: list[int],
                variance_now: float, users_now: int, horizon_users: int, alpha: float) -> SequentialResult:
    """mSPRT on Δ = R_t − R_c at every look, from cumulative moments of the rows up to that look.

    τ² is fixed for all looks from today's variance (`sequential.mixture_variance`), so that the
    running minimum is over one likelihood-ratio martingale.
    """
    at = np.asarray(look_idx) - 1
    mt = Moments.of(y, x, mask=in_t, cumulative=True).at(at)
    mc = Moments.of(y, x, mask=in_c, cumulative=True).at(at)
    delta, var = difference(ratio(mt), ratio(mc))
    tau2 = float(sequential.mixture_variance(variance_now, users_now, horizon_users, alpha))
    ok = np.isfinite(var) & (var > 0) & (mt.n >= 2) & (mc.n >= 2)
    delta, var = np.where(ok, delta, 0.0), np.where(ok, var, 1.0)
    p = sequential.always_valid_p_values(np.where(ok, delta, 0.0), var, np.where(ok, tau2, 0.0))
    low, high = sequential.confidence_sequence(delta, var, tau2, alpha)
    low, high = np.where(ok, low, -np.inf), np.where(ok, high, np.inf)
    return SequentialResult(float(p[-1]), float(np.max(low)), float(np.min(high)), len(look_idx), horizon_users,
                            float(np.sqrt(tau2)), bool(p[-1] < alpha))
