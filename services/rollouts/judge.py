"""The rollout's decision: advance, hold or roll back — a pure function of numbers it is given.

Before a step advances, the challenger is compared with **control over the same window** (the step's hold):

* **readiness** — the challenger's model version must be ready in Triton; not ready rolls back at once;
* **outcomes** — the always-valid non-inferiority tests of the experiment's phase (`experiments/decision.py`
  `guardrails`): a guardrail shown *worse* rolls back; *undecided* holds only when the policy requires every
  guardrail to be non-inferior (`require_non_inferior`), otherwise it is noted and does not block;
* **traffic** — fewer than `min_requests` answered by either arm in the window: hold (nothing to compare yet);
* **latency** — the challenger's p99 must stay within ``control p99 × p99_ratio + p99_slack_s``. Relative to control,
  so a machine-wide tail spike that slows both arms alike does not roll back a healthy challenger; the absolute slack
  keeps millisecond noise on a fast control from counting as a breach;
* **errors, degraded answers** — the challenger's ratio may exceed control's by at most the policy's slack (absolute).

Any breach rolls back (every breached rule is a reason); no breach and enough traffic advances. The loop around it
(`controller.py`) only gathers the numbers, calls this, audits the verdict with its numbers, and acts — the pattern of
`export/gate.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from vitrine.settings import RolloutSettings

Action = Literal["advance", "hold", "rollback"]
ADVANCE: Action = "advance"
HOLD: Action = "hold"
ROLLBACK: Action = "rollback"
ACTIONS: tuple[Action, ...] = (ADVANCE, HOLD, ROLLBACK)
_DEFAULTS = RolloutSettings()


@dataclass(frozen=True)
class ArmFigures:
    """One arm's serving figures over the judged window (the gateway's metrics, through Prometheus)."""

    variant: str
    requests: float
    """Requests answered in the window (any status)."""
    p99_s: float
    """NaN when the arm answered nothing in the window."""
    error_ratio: float
    degraded_ratio: float


@dataclass(frozen=True)
class OutcomeGuardrail:
    """One non-inferiority test of the challenger (a `decision.NonInferiority` reduced to what the judge reads)."""

    metric: str
    status: Literal["non_inferior", "worse", "undecided"]
    low: float = math.nan
    high: float = math.nan
    threshold: float = math.nan


@dataclass(frozen=True)
class Policy:
    """Every threshold of the judge, in one place (defaults: the settings' defaults)."""

    min_requests: int = _DEFAULTS.min_requests
    p99_ratio: float = _DEFAULTS.p99_ratio
    p99_slack_s: float = _DEFAULTS.p99_slack_s
    error_ratio_slack: float = _DEFAULTS.error_ratio_slack
    degraded_ratio_slack: float = _DEFAULTS.degraded_ratio_slack
    require_non_inferior: bool = _DEFAULTS.require_non_inferior

    def __post_init__(self) -> None:
        if self.min_requests < 1 or self.p99_ratio < 1 or self.p99_slack_s < 0:
            raise ValueError("min_requests ≥ 1, p99_ratio ≥ 1 and p99_slack_s ≥ 0")
        if not (0 <= self.error_ratio_slack <= 1 and 0 <= self.degraded_ratio_slack <= 1):
            raise ValueError("error_ratio_slack and degraded_ratio_slack are ratios in [0, 1]")

    @classmethod
    def from_settings(cls, settings: RolloutSettings) -> Policy:
        return cls(min_requests=settings.min_requests, p99_ratio=settings.p99_ratio, p99_slack_s=settings.p99_slack_s,
                   error_ratio_slack=settings.error_ratio_slack, degraded_ratio_slack=settings.degraded_ratio_slack,
                   require_non_inferior=settings.require_non_inferior)


@dataclass(frozen=True)
class Verdict:
    action: Action
    reasons: list[str]
    """Why (every breach for a rollback; what is missing for a hold; the checks passed for an advance)."""
    numbers: dict[str, float | str | bool] = field(default_factory=dict)
    """Every figure and limit the verdict was made from (audited)."""

    def to_dict(self) -> dict:
        return asdict(self)


def judge(challenger: ArmFigures, control: ArmFigures, ready: bool, outcomes: Sequence[OutcomeGuardrail] = (),
          policy: Policy = Policy()) -> Verdict:
    """Advance, hold or roll back the challenger, from the same window's figures of both arms."""
    p99_limit = control.p99_s * policy.p99_ratio + policy.p99_slack_s
    error_limit = control.error_ratio + policy.error_ratio_slack
    degraded_limit = control.degraded_ratio + policy.degraded_ratio_slack
    numbers: dict[str, float | str | bool] = {
        "ready": ready,
        "challenger_requests": challenger.requests, "control_requests": control.requests,
        "challenger_p99_s": challenger.p99_s, "control_p99_s": control.p99_s, "p99_limit_s": p99_limit,
        "challenger_error_ratio": challenger.error_ratio, "control_error_ratio": control.error_ratio, "error_ratio_limit": error_limit,
        "challenger_degraded_ratio": challenger.degraded_ratio, "control_degraded_ratio": control.degraded_ratio,
        "degraded_ratio_limit": degraded_limit, "min_requests": policy.min_requests,
    }
    for g in outcomes:
        numbers[f"outcome_{g.metric}"] = g.status
        numbers[f"outcome_{g.metric}_low"], numbers[f"outcome_{g.metric}_threshold"] = g.low, g.threshold

    breaches: list[str] = []
    if not ready:
        breaches.append(f"the challenger's model is not ready in Triton ({challenger.variant})")
    for g in outcomes:
        if g.status == "worse":
            breaches.append(f"outcome guardrail {g.metric}: the challenger is worse than control "
                            f"(always-valid interval of the difference [{g.low:.4g}, {g.high:.4g}] lies below 0)")
    enough = min(challenger.requests, control.requests) >= policy.min_requests
    if enough:
        if math.isnan(challenger.p99_s) or math.isnan(control.p99_s):
            pass  # handled below as a hold: no latency figure to compare
        elif challenger.p99_s > p99_limit:
            breaches.append(f"p99 {challenger.p99_s * 1000:.1f} ms > {p99_limit * 1000:.1f} ms allowed "
                            f"(control {control.p99_s * 1000:.1f} ms × {policy.p99_ratio:g} + {policy.p99_slack_s * 1000:g} ms)")
        if challenger.error_ratio > error_limit:
            breaches.append(f"error ratio {challenger.error_ratio:.2%} > {error_limit:.2%} allowed "
                            f"(control {control.error_ratio:.2%} + {policy.error_ratio_slack:.2%})")
        if challenger.degraded_ratio > degraded_limit:
            breaches.append(f"degraded ratio {challenger.degraded_ratio:.2%} > {degraded_limit:.2%} allowed "
                            f"(control {control.degraded_ratio:.2%} + {policy.degraded_ratio_slack:.2%})")
    if breaches:
        return Verdict(ROLLBACK, breaches, numbers)

    waits: list[str] = []
    if not enough:
        waits.append(f"too little traffic to compare: challenger {challenger.requests:.0f}, control {control.requests:.0f} "
                     f"requests in the window (at least {policy.min_requests} each)")
    elif math.isnan(challenger.p99_s) or math.isnan(control.p99_s):
        waits.append("no p99 figure for both arms in the window yet")
    undecided = [g.metric for g in outcomes if g.status != "non_inferior"]
    if policy.require_non_inferior and undecided:
        waits.append(f"outcome guardrail(s) not yet shown non-inferior: {', '.join(undecided)}")
    if waits:
        return Verdict(HOLD, waits, numbers)
    passed = [f"p99 {challenger.p99_s * 1000:.1f} ms ≤ {p99_limit * 1000:.1f} ms (control {control.p99_s * 1000:.1f} ms)",
              f"errors {challenger.error_ratio:.2%} ≤ {error_limit:.2%}", f"degraded {challenger.degraded_ratio:.2%} ≤ {degraded_limit:.2%}"]
    if outcomes:
        passed.append("outcomes: " + ", ".join(f"{g.metric} {g.status}" for g in outcomes))
    return Verdict(ADVANCE, passed, numbers)
