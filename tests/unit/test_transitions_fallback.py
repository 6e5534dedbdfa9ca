"""The transitions answer without services: the top-up rule itself, and the request path choosing it —
degraded (model path failed) and for short histories (gateway.transitions_max_history).

The stand-ins for Redis and Triton are those of test_gateway_failures.py; the feature consumer's side
(the Lua script that counts successors) is tested against the real Redis in
tests/integration/test_features.py (a plain-Python reference of the table) and test_gateway_faults.py.
"""

from __future__ import annotations

import pytest

from tests.unit.test_gateway_failures import POPULAR, Context, Store, Triton, gateway, request
from vitrine.contracts.events import EventType
from vitrine.services.features.store import RecentEvent
from vitrine.services.gateway.fallback import TOP_UP_SCORE, steps, successors_then_popular
from vitrine.services.gateway.metrics import SOURCES, label_sets
from vitrine.v1 import recommender_pb2 as pb

pytestmark = pytest.mark.timeout(20)
LAST = "i2"
"""The last item of the stand-in store's shopper (steps i1 → i2)."""
NEXT = [("n1", 9.0), ("p3", 5.0), ("n2", 2.0)]
"""Successors of LAST; p3 is also popular, so it must appear once."""


# --- the rule ----------------------------------------------------------------------------------------
def test_successors_come_first_in_count_order_then_popularity_without_excluded_items_or_repeats() -> None:
    items, from_table = successors_then_popular(NEXT, POPULAR, k=6, excluded={"n2", "p0"})
    assert items == [("n1", 9.0), ("p3", 5.0), ("p1", TOP_UP_SCORE), ("p2", TOP_UP_SCORE), ("p4", TOP_UP_SCORE), ("p5", TOP_UP_SCORE)]
    assert from_table == 2
    assert len({item for item, _ in items}) == len(items)


def test_k_cuts_inside_the_successors_and_no_successor_means_popularity_alone() -> None:
    assert successors_then_popular(NEXT, POPULAR, k=1, excluded=set()) == ([("n1", 9.0)], 1)
    items, from_table = successors_then_popular([], POPULAR, k=3, excluded={"p1"})
    assert [i for i, _ in items] == ["p0", "p2", "p3"] and from_table == 0
    assert successors_then_popular([("n1", 1.0)], POPULAR, k=3, excluded={"n1"})[1] == 0  # all excluded: not a transitions answer


def test_steps_collapse_runs_on_one_item() -> None:
    recent = [RecentEvent(item, EventType.VIEW, ts, f"e{ts}") for ts, item in enumerate(["a", "a", "b", "a", "a", "c"])]
    assert steps(recent) == ["a", "b", "a", "c"]


# --- degraded: the model path failed ----------------------------------------------------------------
async def test_triton_down_answers_with_the_last_items_successors_topped_up_and_says_so() -> None:
    triton = Triton()
    triton.down = True
    service, exposures, metrics = gateway(triton, Store(successors={LAST: NEXT}), transitions_max_history=0)
    reply = await service.Recommend(pb.RecommendRequest(user_id="u1", k=5, exclude_item_ids=["n2"]), Context(5.0))
    assert reply.degraded and reply.degraded_reason == "triton_unavailable" and reply.model_name == "transitions"
    assert [i.item_id for i in reply.items] == ["n1", "p3", "p0", "p1", "p2"]
    assert exposures.records[-1].model_name == "transitions" and exposures.records[-1].degraded
    assert label_sets(metrics.degraded, ("reason", "source")) == {("triton_unavailable", "transitions")}
    assert label_sets(metrics.answers, ("source", "variant")) == {("transitions", "control")}


async def test_degraded_without_successors_is_popularity_from_redis() -> None:
    triton = Triton()
    triton.down = True
    service, _, metrics = gateway(triton, Store(), transitions_max_history=0)
    reply = await service.Recommend(request(k=3), Context(5.0))
    assert reply.degraded and reply.model_name == "popularity" and [i.item_id for i in reply.items] == ["p0", "p1", "p2"]
    assert label_sets(metrics.degraded, ("reason", "source")) == {("triton_unavailable", "popularity")}


# --- short histories: transitions instead of the model ------------------------------------------------
async def test_a_shopper_with_few_steps_gets_the_transitions_answer_without_a_triton_call_and_not_degraded() -> None:
    triton = Triton()
    service, _, metrics = gateway(triton, Store(successors={LAST: NEXT}), transitions_max_history=2)
    await service.fallback.refresh()  # the top-up comes from the in-memory popularity copy
    reply = await service.Recommend(request(k=4), Context(5.0))
    assert not reply.degraded and reply.model_name == "transitions"
    assert [i.item_id for i in reply.items] == ["n1", "p3", "n2", "p0"]
    assert triton.timeouts == []  # no model call at all
    assert label_sets(metrics.answers, ("source",)) == {("transitions",)} and not label_sets(metrics.degraded, ("reason",))


@pytest.mark.parametrize(("max_history", "successors", "expected"), [
    (1, {LAST: NEXT}, "gru4rec"),  # two steps > 1: the model
    (0, {LAST: NEXT}, "gru4rec"),  # 0 disables
    (2, {}, "gru4rec"),            # the table knows nothing after the last item: the model knows more than popularity
])
async def test_the_model_answers_above_the_threshold_when_disabled_or_when_the_table_has_nothing(
        max_history: int, successors: dict, expected: str) -> None:
    triton = Triton()
    service, _, metrics = gateway(triton, Store(successors=successors), transitions_max_history=max_history)
    reply = await service.Recommend(request(k=3), Context(5.0))
    assert not reply.degraded and reply.model_name == expected and len(triton.timeouts) == 1
    assert label_sets(metrics.answers, ("source",)) == {("model",)}


def test_every_source_label_is_from_the_fixed_set() -> None:
    assert len(set(SOURCES)) == len(SOURCES) and "transitions" in SOURCES and "model" in SOURCES
