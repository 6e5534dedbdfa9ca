"""Team-draft interleaving and the gateway's interleave mode, without services."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.unit.test_gateway_failures import POPULAR, Context, Triton, gateway, request
from vitrine.contracts.exposures import INTERLEAVE
from vitrine.services.gateway.experiment import Experiment, Variant
from vitrine.services.gateway.interleaving import team_draft

pytestmark = pytest.mark.timeout(20)
A = [(f"a{n}", float(10 - n)) for n in range(10)]
B = [(f"b{n}", float(10 - n)) for n in range(10)]


def test_each_team_places_its_own_best_remaining_items_in_turns() -> None:
    for seed in range(200):
        merged = team_draft(A, B, 8, f"r{seed}", ("x", "y"))
        assert len(merged) == 8 and len({i for i, _, _ in merged}) == 8
        for prefix in range(1, 9):  # after every round the picks differ by at most one
            teams = Counter(t for _, _, t in merged[:prefix])
            assert abs(teams["x"] - teams["y"]) <= 1
        assert [i for i, _, t in merged if t == "x"] == [i for i, _ in A[:4]]  # in each team's own order
        assert [i for i, _, t in merged if t == "y"] == [i for i, _ in B[:4]]


def test_shared_items_go_to_whoever_picks_them_first_and_are_never_repeated() -> None:
    b = [A[1], A[0], *B[:8]]
    merged = team_draft(A, b, 6, "seed", ("x", "y"))
    items = [i for i, _, _ in merged]
    assert len(items) == len(set(items)) == 6 and {"a0", "a1"} <= set(items)


def test_the_coin_is_fair_and_reproducible() -> None:
    first = Counter(team_draft(A, B, 2, f"req-{n}", ("x", "y"))[0][2] for n in range(4000))
    assert abs(first["x"] / 4000 - 0.5) < 0.03  # ± ~4 standard errors
    assert team_draft(A, B, 6, "same", ("x", "y")) == team_draft(A, B, 6, "same", ("x", "y"))


def test_one_list_running_out_lets_the_other_fill_the_answer() -> None:
    merged = team_draft(A[:2], B, 6, "s", ("x", "y"))
    assert len(merged) == 6 and [t for _, _, t in merged].count("x") == 2


async def test_interleave_mode_answers_from_both_models_and_logs_who_placed_each_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    experiment = Experiment(salt="s", mode=INTERLEAVE, revision=3, name="rank-test", variants=(
        Variant(name="control", model_name="gru4rec", weight=50), Variant(name="baseline", model_name="popularity", weight=50)))
    service, exposures, _ = gateway(Triton())
    monkeypatch.setattr(service.experiment, "current", experiment)
    reply = await service.Recommend(request("u1", k=6), Context(5.0))
    assert reply.variant == INTERLEAVE and not reply.degraded and len(reply.items) == 6
    teams = [item.variant for item in reply.items]
    assert set(teams) == {"control", "baseline"}
    assert {i.item_id for i in reply.items if i.variant == "baseline"} <= {p for p, _ in POPULAR}
    (exposure,) = exposures.records
    assert exposure.mode == INTERLEAVE and exposure.revision == 3 and exposure.experiment == "rank-test"
    assert exposure.slot_variants == teams and exposure.item_ids == [i.item_id for i in reply.items]
    assert reply.features_ts_ms > 0 and exposure.features_ts_ms == reply.features_ts_ms


async def test_a_popularity_variant_is_an_arm_of_its_own_not_a_degraded_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    experiment = Experiment(salt="s", variants=(Variant(name="baseline", model_name="popularity", weight=100),))
    triton = Triton()
    service, exposures, _ = gateway(triton)
    monkeypatch.setattr(service.experiment, "current", experiment)
    reply = await service.Recommend(request("u1", k=4), Context(5.0))
    assert reply.variant == "baseline" and reply.model_name == "popularity" and not reply.degraded
    assert [i.item_id for i in reply.items] == [p for p, _ in POPULAR[:4]] and triton.timeouts == []
    assert exposures.records[0].mode == "ab" and exposures.records[0].slot_variants == []


def test_interleaving_needs_exactly_two_variants() -> None:
    with pytest.raises(ValueError, match="exactly two"):
        Experiment(salt="s", mode=INTERLEAVE, variants=(Variant(name="only", model_name="gru4rec", weight=100),))
