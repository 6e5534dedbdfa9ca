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


async def test_an_aa_through_a_ramp_names_no_winner_and_no_srm(stack: Stack) -> None:
    """gru4rec against itself, 10 % → 50 %: two revisions of one test (one α), users by the revision they entered in,
    returning users kept while their variant stays; the report and the monitor name no winner and no SRM."""
    settings = stack.settings
    tag = uuid.uuid4().hex[:6]
    salt, prefix = f"aa-{tag}", f"aa-{tag}-"
    client = aioredis.Redis(host=settings.redis.host, port=settings.redis.port)
    store = OutcomeStore(client, settings.outcomes)

    async def split(treatment: int) -> pb.Experiment:
        async with GatewayClient(settings.gateway.address, EXPERIMENTER) as admin:
            return await admin.set_experiment(pb.Experiment(name=previous.name, salt=salt, mode="ab", variants=[
                pb.Variant(name="control", model_name="gru4rec", weight=100 - treatment),
                pb.Variant(name="treatment", model_name="gru4rec", weight=treatment)]))

    async def shoppers(applied: pb.Experiment, seed: int, users: int) -> None:
        simulated = await Simulation(settings, SimulationConfig(rate=25, duration_s=20, seed=seed, user_prefix=prefix, users=users)).run()
        assert simulated.requests > 400 and not simulated.errors

        async def joined() -> int | None:
            total = sum(r.exposures for r in await store.user_outcomes(applied.name, applied.revision))
            return total if total >= simulated.requests else None

        await eventually(joined, 60, f"the outcome service to join revision {applied.revision}'s answers")

    async with GatewayClient(settings.gateway.address, EXPERIMENTER) as admin:
        previous = await admin.get_experiment()
    try:
        first = await split(10)
        await shoppers(first, seed=31, users=300)
        ramped = await split(50)
        await shoppers(ramped, seed=32, users=600)  # half of them came before the ramp

        async def monitored() -> dict | None:
            evidence = await store.load_evidence(ramped.name, first.revision)
            return evidence if evidence and evidence["looks"] >= 1 and evidence["keys"] else None

        evidence = await eventually(monitored, 3 * settings.outcomes.monitor_interval_s + 20, "the monitor's look at the ramped test")
        report = await build(settings, None, with_guardrails=False)
        assert report.phase == [first.revision, ramped.revision], report.table()
        assert report.analysis is not None and report.analysis.strata == [first.revision, ramped.revision], report.table()
        assert report.decision is not None and report.decision.looks >= evidence["looks"] + 1
        assert not report.decision.srm_flagged and evidence["srm_flagged_at_ms"] is None, report.table()
        assert not report.decision.winners and "no decision yet on CTR" in report.verdict(), report.table()
        assert evidence["keys"]["treatment:ctr"]["p"] >= 0.05, evidence
        users = {v.variant: v.users for v in report.analysis.variants}
        assert users["control"] > users["treatment"] > 0.2 * users["control"], users  # 90/10 then 50/50 entrants
    finally:
        await client.aclose()
        await _restore(stack, previous)
