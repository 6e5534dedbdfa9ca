"""The rollout judge with planted window figures: control and challenger over the same minutes."""

from __future__ import annotations

import math

import pytest

from vitrine.services.rollouts.judge import ADVANCE, HOLD, ROLLBACK, ArmFigures, OutcomeGuardrail, Policy, judge

POLICY = Policy(min_requests=50, p99_ratio=1.5, p99_slack_s=0.005, error_ratio_slack=0.01, degraded_ratio_slack=0.05)


def arm(variant: str, requests: float = 500, p99_ms: float = 10.0, errors: float = 0.0, degraded: float = 0.0) -> ArmFigures:
    return ArmFigures(variant, requests, p99_ms / 1000, errors, degraded)


def test_a_healthy_challenger_advances_with_its_numbers() -> None:
    verdict = judge(arm("challenger", p99_ms=11), arm("control", p99_ms=10), ready=True, policy=POLICY)
    assert verdict.action == ADVANCE
    assert verdict.numbers["challenger_p99_s"] == pytest.approx(0.011)
    assert verdict.numbers["p99_limit_s"] == pytest.approx(0.010 * 1.5 + 0.005)


def test_a_machine_wide_latency_spike_that_hits_both_arms_does_not_roll_back() -> None:
    # Both arms' p99 ten times their usual 10 ms (a noisy neighbour, a GC pause on the host): relative to control the
    # challenger is as fast as ever. An absolute bound (say 50 ms) would have rolled it back.
    verdict = judge(arm("challenger", p99_ms=105), arm("control", p99_ms=100), ready=True, policy=POLICY)
    assert verdict.action == ADVANCE, verdict.reasons


def test_a_machine_wide_error_burst_on_both_arms_does_not_roll_back() -> None:
    verdict = judge(arm("challenger", errors=0.20, degraded=0.30), arm("control", errors=0.195, degraded=0.29), ready=True, policy=POLICY)
    assert verdict.action == ADVANCE, verdict.reasons


def test_a_challenger_slower_than_control_in_the_same_window_rolls_back() -> None:
    verdict = judge(arm("challenger", p99_ms=40), arm("control", p99_ms=10), ready=True, policy=POLICY)
    assert verdict.action == ROLLBACK
    assert len(verdict.reasons) == 1 and verdict.reasons[0].startswith("p99 40.0 ms > 20.0 ms allowed")


def test_the_absolute_slack_keeps_millisecond_noise_on_a_fast_control_from_rolling_back() -> None:
    assert judge(arm("challenger", p99_ms=4.5), arm("control", p99_ms=1.0), ready=True, policy=POLICY).action == ADVANCE
    assert judge(arm("challenger", p99_ms=7.0), arm("control", p99_ms=1.0), ready=True, policy=POLICY).action == ROLLBACK


@pytest.mark.parametrize(("errors", "degraded", "expected"), [
    (0.05, 0.0, "error ratio 5.00% > 1.10% allowed"),
    (0.0, 0.40, "degraded ratio 40.00% > 5.20% allowed"),
])
def test_an_erroring_or_degraded_challenger_rolls_back(errors: float, degraded: float, expected: str) -> None:
    verdict = judge(arm("challenger", errors=errors, degraded=degraded), arm("control", errors=0.001, degraded=0.002), ready=True, policy=POLICY)
    assert verdict.action == ROLLBACK and verdict.reasons[0].startswith(expected), verdict.reasons


def test_a_challenger_not_ready_rolls_back_even_without_traffic() -> None:
    verdict = judge(arm("challenger", requests=0, p99_ms=math.nan), arm("control"), ready=False, policy=POLICY)
    assert verdict.action == ROLLBACK and "not ready" in verdict.reasons[0]


def test_every_breach_is_a_reason() -> None:
    verdict = judge(arm("challenger", p99_ms=100, errors=0.5, degraded=0.5), arm("control"), ready=False, policy=POLICY)
    assert verdict.action == ROLLBACK and len(verdict.reasons) == 4


def test_an_outcome_guardrail_shown_worse_rolls_back() -> None:
    worse = OutcomeGuardrail("conversion", "worse", low=-0.03, high=-0.01, threshold=-0.002)
    verdict = judge(arm("challenger"), arm("control"), ready=True, outcomes=[worse], policy=POLICY)
    assert verdict.action == ROLLBACK and verdict.reasons[0].startswith("outcome guardrail conversion")
    assert verdict.numbers["outcome_conversion"] == "worse"


def test_an_undecided_outcome_guardrail_blocks_only_when_the_policy_requires_non_inferiority() -> None:
    undecided = [OutcomeGuardrail("conversion", "undecided", low=-0.01, high=0.01, threshold=-0.002)]
    assert judge(arm("challenger"), arm("control"), True, undecided, POLICY).action == ADVANCE
    strict = Policy(min_requests=50, require_non_inferior=True)
    verdict = judge(arm("challenger"), arm("control"), True, undecided, strict)
    assert verdict.action == HOLD and "conversion" in verdict.reasons[0]
    shown = [OutcomeGuardrail("conversion", "non_inferior", low=-0.001, high=0.01, threshold=-0.002)]
    assert judge(arm("challenger"), arm("control"), True, shown, strict).action == ADVANCE


@pytest.mark.parametrize(("challenger", "control"), [(49, 500), (500, 10), (0, 0)])
def test_too_little_traffic_in_either_arm_holds(challenger: int, control: int) -> None:
    # A tiny sample's p99 and ratios say nothing: even a bad-looking one holds, it does not roll back.
    verdict = judge(arm("challenger", requests=challenger, p99_ms=90, errors=0.5), arm("control", requests=control), True, policy=POLICY)
    assert verdict.action == HOLD and "too little traffic" in verdict.reasons[0]


def test_no_latency_figure_holds() -> None:
    verdict = judge(arm("challenger", p99_ms=math.nan), arm("control"), True, policy=POLICY)
    assert verdict.action == HOLD


def test_the_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="p99_ratio"):
        Policy(p99_ratio=0.5)
    with pytest.raises(ValueError, match="slack"):
        Policy(error_ratio_slack=2)
