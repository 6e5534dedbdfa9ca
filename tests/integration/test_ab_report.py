"""The loop on the real stack: simulated shoppers react to two arms, the outcome service joins their
events with the answers, and `vitrine ab report` names the better model — in A/B and in interleaving."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from tests.integration.invariants import eventually
from vitrine.commands.ab_report import build
from vitrine.services.gateway.client import GatewayClient
from vitrine.services.outcomes.store import OutcomeStore
from vitrine.services.simulator.runner import Simulation, SimulationConfig
from vitrine.services.stack import Stack
from vitrine.v1 import recommender_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
EXPERIMENTER = "vitrine-demo-experimenter"
ARMS = (("control", "popularity"), ("treatment", "gru4rec"))


async def _run(stack: Stack, mode: str, seconds: float) -> tuple[pb.Experiment, int]:
    """Set the two arms in `mode`, simulate `seconds` of shoppers, wait until every answer is joined."""
    settings = stack.settings
    async with GatewayClient(settings.gateway.address, EXPERIMENTER) as admin:
        current = await admin.get_experiment()
        applied = await admin.set_experiment(pb.Experiment(name=current.name, salt=current.salt, mode=mode, variants=[
            pb.Variant(name=name, model_name=model, weight=50) for name, model in ARMS]))
    config = SimulationConfig(rate=25, duration_s=seconds, seed=11, user_prefix=f"rep-{uuid.uuid4().hex[:6]}-")
    simulated = await Simulation(settings, config).run()
    assert simulated.requests > 0.9 * config.rate * seconds and not simulated.errors
    client = aioredis.Redis(host=settings.redis.host, port=settings.redis.port)
    store = OutcomeStore(client, settings.outcomes)

    async def joined() -> int | None:
        if mode == "interleave":
            rows = await store.interleaved_outcomes(applied.name, applied.revision)
            return len(rows) if rows else None
        total = sum(r.exposures for r in await store.user_outcomes(applied.name, applied.revision))
        return total if total >= simulated.requests else None

    try:
        await eventually(joined, 60, "the outcome service to join every simulated answer")
    finally:
        await client.aclose()
    return current, applied.revision


async def _restore(stack: Stack, previous: pb.Experiment) -> None:
    async with GatewayClient(stack.settings.gateway.address, EXPERIMENTER) as admin:
        await admin.set_experiment(pb.Experiment(name=previous.name, salt=previous.salt, mode=previous.mode, variants=previous.variants))


async def test_the_report_names_the_better_model_of_an_ab_test(stack: Stack) -> None:
    previous, revision = await _run(stack, "ab", 25)
    try:
        report = await build(stack.settings, revision, with_guardrails=True)
        assert report.analysis is not None and not report.analysis.srm.flagged
        ctr = next(c for c in report.analysis.comparisons if c.metric == "ctr" and c.variant == "treatment")
        assert ctr.relative.low > 0, report.table()  # the personalised model earns more clicks per impression
        assert report.verdict().startswith("treatment wins on CTR"), report.table()
        assert {g.variant for g in report.guardrails} == {"control", "treatment"}
        assert all(g.requests_per_s > 0 for g in report.guardrails)
    finally:
        await _restore(stack, previous)


async def test_interleaving_credits_clicks_to_the_model_that_placed_the_item(stack: Stack) -> None:
    previous, revision = await _run(stack, "interleave", 20)
    try:
        report = await build(stack.settings, revision, with_guardrails=False)
        result = report.interleaving
        assert result is not None, report.table()
        prefer_gru4rec = result.users_prefer_a if result.team_a == "treatment" else result.users_prefer_b
        prefer_popularity = result.users_prefer_b if result.team_a == "treatment" else result.users_prefer_a
        assert prefer_gru4rec > 2 * prefer_popularity and result.winner == "treatment", report.table()
    finally:
        await _restore(stack, previous)
