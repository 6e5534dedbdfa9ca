"""From looks to a decision: the evidence kept across looks and revisions, and what it allows us to say.

`analysis.analyse` is one look. A decision needs every look of the experiment's phase (see `revisions`):

* **One α per experiment.** The always-valid p-value is the running minimum of the mSPRT's per-look
  p-values and the confidence sequence their running intersection, over *every* look of the phase — a ramp's
  new revision does not start a fresh minimum at p = 1 (that would spend α once per revision). τ² is fixed
  at the first look and kept (a minimum over one martingale, not several). The interval shown is this
  intersection, so "p < α" and "the interval excludes 0" always agree.
* **SRM is sticky.** The sequential SRM p-value's running minimum; once below 0.001 the flag stays.
* **Multiple comparisons.** The verdict is about one metric (CTR) across up to 15 variants against control:
  Holm's step-down correction (Holm, "A simple sequentially rejective multiple test procedure", Scand. J.
  Statist. 1979) over those always-valid p-values controls the family-wise
  error at α whatever their dependence. The other metrics are secondary: Holm over all of them and all
  variants, shown, never deciding. (The split of success and secondary metrics follows Schultzberg,
  Ankargren & Frånberg, "Risk-aware product decisions in A/B tests with multiple metrics", 2024.)
* **Guardrails are non-inferiority tests.** A variant is *non-inferior* on a guardrail metric when the
  always-valid interval's lower bound is above ``−margin × control``; *worse* when its upper bound is below 0
  (always-valid evidence of harm); otherwise *undecided*. Both statements hold at every look with error at
  most α (the confidence sequence covers the true difference at all looks at once). A rollout calls
  `guardrails` between steps.

Everything here is pure: the evidence is a JSON-able dict the monitor stores in Redis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Final, Literal

import numpy as np

from vitrine.experiments.analysis import ExperimentAnalysis
from vitrine.experiments.estimators import ALPHA
from vitrine.experiments.interleaving import InterleavingResult
from vitrine.experiments.srm import SRM_THRESHOLD

DECISION_METRIC: Final = "ctr"
"""The outcome the verdict is about (the others are secondary)."""
DEFAULT_GUARDRAILS: Final = {"conversion": 0.05}
"""Guardrail metric → relative non-inferiority margin (`outcomes.guardrail_margins` in the settings)."""
INTERLEAVING_KEY: Final = "interleaving"


@dataclass
class KeyEvidence:
    """The running evidence of one comparison ("variant:metric") over the phase's looks."""

    tau2: float
    p: float = 1.0
    low: float = -math.inf
    high: float = math.inf
    looks: int = 0
    estimator: str = "plain"


@dataclass
class Evidence:
    """Everything a decision needs from earlier looks of one phase (JSON-able: `to_dict` / `from_dict`)."""

    experiment: str
    phase_start: int
    keys: dict[str, KeyEvidence] = field(default_factory=dict)
    srm_p: float = 1.0
    srm_flagged_at_ms: int | None = None
    looks: int = 0

    def tau2(self) -> dict[str, float]:
        return {k: e.tau2 for k, e in self.keys.items()}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping) -> Evidence:
        keys = {k: KeyEvidence(**v) for k, v in raw.get("keys", {}).items()}
        return cls(raw["experiment"], int(raw["phase_start"]), keys, float(raw.get("srm_p", 1.0)),
                   raw.get("srm_flagged_at_ms"), int(raw.get("looks", 0)))


def update(evidence: Evidence, analysis: ExperimentAnalysis | None, interleaving: InterleavingResult | None,
           now_ms: int) -> Evidence:
    """The evidence after one more look (a new object; the old one is left as it was)."""
    new = Evidence.from_dict(evidence.to_dict())
    new.looks += 1
    if analysis is not None:
        for c in analysis.comparisons:
            key, s = f"{c.variant}:{c.metric}", c.sequential
            kept = new.keys.get(key) or KeyEvidence(tau2=s.tau2, estimator=s.estimator)
            if math.isfinite(s.low) and math.isfinite(s.high):
                kept.p, kept.low, kept.high = min(kept.p, s.p_value), max(kept.low, s.low), min(kept.high, s.high)
            kept.looks += 1
            new.keys[key] = kept
        new.srm_p = min(new.srm_p, analysis.srm.p_value)
        if analysis.srm.flagged or new.srm_p < SRM_THRESHOLD:
            new.srm_flagged_at_ms = new.srm_flagged_at_ms or now_ms
    if interleaving is not None:
        kept = new.keys.get(INTERLEAVING_KEY) or KeyEvidence(tau2=interleaving.prior_a, low=0.0, high=1.0, estimator="beta-binomial")
        kept.p = min(kept.p, interleaving.sequential_p)
        kept.low, kept.high = max(kept.low, interleaving.sequential_low), min(kept.high, interleaving.sequential_high)
        kept.looks += 1
        new.keys[INTERLEAVING_KEY] = kept
    return new


@dataclass(frozen=True)
class ComparisonDecision:
    variant: str
    metric: str
    p_value: float
    """Always-valid: the running minimum over every look of the phase."""
    adjusted_p: float
    """Holm-adjusted within its family (the decision metric's, or the secondary metrics')."""
    low: float
    high: float
    """The always-valid interval of the absolute difference (running intersection)."""
    estimate: float
    estimator: str
    relative_low: float
    relative_high: float
    """The interval divided by control's current value (approximate: control's value is an estimate too)."""
    significant: bool


@dataclass(frozen=True)
class NonInferiority:
    variant: str
    metric: str
    margin: float
    """Relative: the variant may be at most this much worse than control."""
    low: float
    high: float
    """The always-valid interval of the absolute difference."""
    threshold: float
    """``−margin × control``: the lower bound must be above it."""
    status: Literal["non_inferior", "worse", "undecided"]


@dataclass(frozen=True)
class Decision:
    srm_flagged: bool
    srm_p_value: float
    comparisons: list[ComparisonDecision]
    guardrails: list[NonInferiority]
    winners: list[str]
    looks: int
    text: str

    def to_dict(self) -> dict:
        return asdict(self)


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values in the given order: sorted ascending, ``p̃_(i) = max_{j≤i} min(1, (m − j + 1) p_(j))``
    (Holm 1979; Wright, "Adjusted P-Values for Simultaneous Inference", Biometrics 1992, eq. 2).

    Written here rather than called from statsmodels' `multipletests(method="holm")`, which returns the same values
    (a unit test compares them) but runs `gc.collect()` on every call — ~30 ms on the monitor's event loop.
    """
    if not p_values:
        return []
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    m = p.size
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adjusted
    return [float(v) for v in out]


def guardrails(analysis: ExperimentAnalysis, evidence: Evidence, margins: Mapping[str, float]) -> list[NonInferiority]:
    """Each variant's non-inferiority on each guardrail metric, from the always-valid intervals."""
    out = []
    for c in analysis.comparisons:
        if c.metric not in margins:
            continue
        kept = evidence.keys.get(f"{c.variant}:{c.metric}")
        low, high = (kept.low, kept.high) if kept else (c.sequential.low, c.sequential.high)
        threshold = -margins[c.metric] * abs(c.control_estimate)
        status = "non_inferior" if low > threshold else "worse" if high < 0 else "undecided"
        out.append(NonInferiority(c.variant, c.metric, margins[c.metric], low, high, threshold, status))
    return out


def decide(evidence: Evidence, analysis: ExperimentAnalysis | None, interleaving: InterleavingResult | None = None,
           alpha: float = ALPHA, margins: Mapping[str, float] = DEFAULT_GUARDRAILS) -> Decision:
    """What the evidence (already updated with this look) allows us to say."""
    srm_flagged = evidence.srm_flagged_at_ms is not None
    if interleaving is not None:
        kept = evidence.keys.get(INTERLEAVING_KEY)
        p = kept.p if kept else interleaving.sequential_p
        low, high = (kept.low, kept.high) if kept else (interleaving.sequential_low, interleaving.sequential_high)
        i = interleaving
        if p < alpha:
            winner = i.team_a if low > 0.5 else i.team_b
            share = i.preference_a if winner == i.team_a else 1 - i.preference_a
            text = (f"{winner} is preferred by {share:.1%} of users with a preference (always-valid p = {p:.2g}, "
                    f"{i.users_prefer_a + i.users_prefer_b} voting users, {evidence.looks} looks)")
            return Decision(False, 1.0, [ComparisonDecision(winner, "preference", p, p, low, high, i.preference_a, "beta-binomial",
                                                            low, high, True)], [], [winner], evidence.looks, text)
        return Decision(False, 1.0, [], [], [], evidence.looks,
                        f"no preference yet between {i.team_a} and {i.team_b} (always-valid p = {p:.2g})")
    if analysis is None:
        return Decision(srm_flagged, evidence.srm_p, [], [], [], evidence.looks, "no outcomes yet")
    decisions = []
    families: dict[bool, list[int]] = {True: [], False: []}
    for c in analysis.comparisons:
        kept = evidence.keys.get(f"{c.variant}:{c.metric}") or KeyEvidence(c.sequential.tau2, c.sequential.p_value,
                                                                            c.sequential.low, c.sequential.high)
        base = abs(c.control_estimate) or math.nan
        decisions.append([c.variant, c.metric, kept.p, kept.p, kept.low, kept.high, c.sequential.estimate, c.sequential.estimator,
                          kept.low / base, kept.high / base, False])
        families[c.metric == DECISION_METRIC].append(len(decisions) - 1)
    for members in families.values():
        for i, adjusted in zip(members, holm([decisions[i][2] for i in members]), strict=True):
            decisions[i][3] = adjusted
            decisions[i][10] = adjusted < alpha
    result = [ComparisonDecision(*d) for d in decisions]
    guards = guardrails(analysis, evidence, margins)
    winners: list[str] = []
    parts = []
    if srm_flagged:
        text = (f"sample ratio mismatch (always-valid p = {evidence.srm_p:.2g}; the flag stays): the split is not what was "
                "configured — do not trust these results")
        return Decision(True, evidence.srm_p, result, guards, [], evidence.looks, text)
    for d in result:
        if d.metric != DECISION_METRIC:
            continue
        rel = f"[{d.relative_low:+.2%}, {d.relative_high:+.2%}]"
        if d.significant:
            better = d.variant if d.low > 0 else analysis.control
            winners.append(better)
            parts.append(f"{better} wins on CTR: {d.variant} vs {analysis.control} {rel} (always-valid p = {d.p_value:.2g}, "
                         f"Holm {d.adjusted_p:.2g})")
        else:
            parts.append(f"{d.variant} vs {analysis.control}: no decision yet on CTR ({rel}, always-valid p = {d.p_value:.2g}, "
                         f"Holm {d.adjusted_p:.2g})")
    text = "; ".join(parts) or "no comparison (one variant only)"
    return Decision(False, evidence.srm_p, result, guards, winners, evidence.looks, text)
