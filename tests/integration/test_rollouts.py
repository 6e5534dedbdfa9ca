"""Rollouts on the real stack: simulated shoppers (the project's simulator) keep both arms busy while the stack's
rollout controller (the `rollouts` component, `vitrine rollouts run`) judges each step against control over the same
window, and a person's commands go through the CLI. Holds are seconds here instead of minutes (the test stack's
`rollouts` settings: tests/integration/conftest.py).

The rollout changes the stack's experiment (the one Prometheus sees the gateway serve); each test puts the previous
experiment back and removes the rollout's state."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

from tests.integration.invariants import eventually
from vitrine.services.gateway.client import GatewayClient
from vitrine.services.gateway.experiment import ExperimentStore
from vitrine.services.rollouts.metrics import DECISIONS, STEP
from vitrine.services.rollouts.store import COMPLETED, ROLLED_BACK, RolloutState, RolloutStore
from vitrine.services.simulator.runner import Simulation, SimulationConfig
from vitrine.services.stack import Stack
from vitrine.services.stack.components import settings_env
from vitrine.services.stack.health import rollouts_ready
from vitrine.settings import Settings
from vitrine.v1 import recommender_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]
EXPERIMENTER = "vitrine-demo-experimenter"
STEPS = "20,50,100"
HOLD = "4s"


@pytest.fixture
async def stores(stack: Stack, settings: Settings) -> AsyncIterator[tuple[ExperimentStore, RolloutStore]]:
    """The stack's experiment and rollout stores; afterwards the previous experiment is back and no rollout is left."""
    client = aioredis.Redis(host=settings.redis.host, port=settings.redis.port)
    experiments, rollouts = ExperimentStore(client, settings.features.namespace), RolloutStore(client, settings.features.namespace)
    async with GatewayClient(settings.gateway.address, EXPERIMENTER) as admin:
        previous = await admin.get_experiment()
    try:
        yield experiments, rollouts
    finally:
        await client.delete(rollouts.key, rollouts.audit_key)
        async with GatewayClient(settings.gateway.address, EXPERIMENTER) as admin:
            await admin.set_experiment(pb.Experiment(name=previous.name, salt=previous.salt, mode=previous.mode, variants=previous.variants))
        await client.aclose()


async def restart_controller(stack: Stack) -> None:
    """Stop the stack's controller and start it again, ready when its probe says so (it has read the state from Redis)."""
    await asyncio.to_thread(stack.supervisor.rpc_stop, "rollouts")
    await asyncio.to_thread(stack.supervisor.start, "rollouts")

    async def ready() -> bool | None:
        return True if await rollouts_ready(stack.settings) is None else None

    await eventually(ready, 30, "the restarted rollout controller to read the state")


async def vitrine(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "vitrine", *args], env={**os.environ, **settings_env(settings)},
                                   capture_output=True, text=True, timeout=60)


@contextlib.asynccontextmanager
async def shoppers(settings: Settings, seconds: float) -> AsyncIterator[None]:
    """Simulated shoppers (with histories, so that models rank them) visiting at 30/s in the background."""
    config = SimulationConfig(rate=30, duration_s=seconds, seed=5, user_prefix=f"ro-{uuid.uuid4().hex[:6]}-")
    task = asyncio.create_task(Simulation(settings, config).run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def reached(rollouts: RolloutStore, check) -> RolloutState | None:  # noqa: ANN001
    state = await rollouts.load()
    return state if state is not None and check(state) else None


async def test_a_healthy_challenger_walks_every_step_to_100_percent_across_a_controller_restart(
        stack: Stack, settings: Settings, stores: tuple[ExperimentStore, RolloutStore]) -> None:
    experiments, rollouts = stores
    async with shoppers(settings, 90):
        started = await vitrine(settings, "rollout", "start", "sasrec", "--steps", STEPS, "--hold", HOLD)
        assert started.returncode == 0, started.stderr
        assert {v.name: v.weight for v in (await experiments.load()).variants} == {"control": 80, "challenger": 20}
        first = await eventually(lambda: reached(rollouts, lambda s: s.step >= 1 or s.status != "running"), 40, "the first advance (20 % → 50 %)")
        # The controller restarts between steps; the new process continues from the state in Redis, not from the beginning.
        await restart_controller(stack)
        done = await eventually(lambda: reached(rollouts, lambda s: s.status != "running"), 40, "the rollout to end")
        metrics = httpx.get(f"http://{settings.rollouts.metrics_host}:{settings.rollouts.metrics_port}/metrics", timeout=5).text
    audit = list(reversed(await rollouts.audit()))
    assert first.step == 1 and done.status == COMPLETED, [(e.action, e.reasons) for e in audit]
    assert [e.action for e in audit if e.action != "hold"] == ["start", "advance", "complete"]
    assert [e.weights[1]["challenger"] for e in audit if e.action != "hold"] == [20, 50, 100]
    for entry in (e for e in audit if e.action in ("advance", "complete")):
        assert entry.by == "rollout-controller" and entry.numbers["ready"] is True
        assert entry.numbers["challenger_requests"] >= 15 and entry.numbers["control_requests"] >= 15, entry.numbers
        assert entry.numbers["challenger_p99_s"] <= entry.numbers["p99_limit_s"]
    final = await experiments.load()
    assert {v.name: v.weight for v in final.variants} == {"control": 0, "challenger": 100} and final.revision == done.experiment_revision
    assert f'{STEP}{{model="sasrec"}} 100.0' in metrics
    assert f'{DECISIONS}{{action="complete"}} 1.0' in metrics  # counted by the restarted process: the last step was its own
    status = await vitrine(settings, "rollout", "status")
    assert status.returncode == 0 and "completed, 100 %" in status.stdout, status.stdout


async def test_a_failing_challenger_is_rolled_back_to_0_percent_within_one_step_and_the_audit_says_why(
        settings: Settings, stores: tuple[ExperimentStore, RolloutStore]) -> None:
    # `smoke` is ready in Triton but is no ranker (no vocabulary, other tensors): every answer for its variant is
    # degraded, while control answers normally in the same window.
    experiments, rollouts = stores
    async with shoppers(settings, 60):
        started = await vitrine(settings, "rollout", "start", "smoke", "--steps", STEPS, "--hold", HOLD)
        assert started.returncode == 0, started.stderr
        done = await eventually(lambda: reached(rollouts, lambda s: s.status != "running"), 40, "a decision to end the rollout")
    audit = await rollouts.audit()
    assert done.status == ROLLED_BACK and done.step == 0, [(e.action, e.reasons) for e in audit]
    rollback = audit[0]
    assert rollback.action == "rollback" and rollback.weights == ({"control": 80, "challenger": 20}, {"control": 100, "challenger": 0})
    assert any(r.startswith("degraded ratio") for r in rollback.reasons), rollback.reasons
    assert rollback.numbers["challenger_degraded_ratio"] > rollback.numbers["degraded_ratio_limit"]
    assert {v.name: v.weight for v in (await experiments.load()).variants} == {"control": 100, "challenger": 0}
    status = await vitrine(settings, "rollout", "status")
    assert "rolled_back, 0 %" in status.stdout and "degraded ratio" in status.stdout, status.stdout


async def test_a_challenger_that_triton_does_not_serve_is_refused_at_start(settings: Settings, stores: tuple[ExperimentStore, RolloutStore]) -> None:
    experiments, rollouts = stores
    before = await experiments.load()
    refused = await vitrine(settings, "rollout", "start", "nosuchmodel", "--hold", HOLD)
    assert refused.returncode == 1 and "nosuchmodel is not ready in Triton" in refused.stderr, refused.stderr
    assert await rollouts.load() is None and (await experiments.load()).revision == before.revision


async def test_a_person_pauses_resumes_and_aborts_and_a_split_changed_by_someone_else_pauses_the_rollout(
        settings: Settings, stores: tuple[ExperimentStore, RolloutStore]) -> None:
    experiments, rollouts = stores
    started = await vitrine(settings, "rollout", "start", "sasrec", "--steps", "10,100", "--hold", "1h")  # never judged here
    assert started.returncode == 0, started.stderr
    second = await vitrine(settings, "rollout", "start", "gru4rec", "--hold", HOLD)
    assert second.returncode == 1 and "is running at 10 %; abort it first" in second.stderr, second.stderr
    paused = await vitrine(settings, "rollout", "pause")
    assert paused.returncode == 0 and "paused at 10 %" in paused.stdout, paused.stderr
    again = await vitrine(settings, "rollout", "pause")
    assert again.returncode == 1 and "pause applies to a rollout that is running" in again.stderr, again.stderr
    resumed = await vitrine(settings, "rollout", "resume")
    assert resumed.returncode == 0 and "running at 10 %" in resumed.stdout, resumed.stderr
    # An experimenter changes the split behind the rollout's back: the controller notices at its next tick and pauses.
    async with GatewayClient(settings.gateway.address, EXPERIMENTER) as admin:
        current = await admin.get_experiment()
        await admin.set_experiment(pb.Experiment(name=current.name, salt=current.salt, mode=current.mode, variants=[
            pb.Variant(name=v.name, model_name=v.model_name, model_version=v.model_version, weight=50) for v in current.variants]))
    state = await eventually(lambda: reached(rollouts, lambda s: s.status == "paused"), 10, "the controller to pause the rollout")
    assert "somebody else changed the split" in state.reason and (await rollouts.audit())[0].by == "rollout-controller"
    refused = await vitrine(settings, "rollout", "resume")
    assert refused.returncode == 1 and "somebody changed the split" in refused.stderr, refused.stderr
    aborted = await vitrine(settings, "rollout", "abort")
    assert aborted.returncode == 0 and "aborted at 0 %" in aborted.stdout, aborted.stderr
    assert {v.name: v.weight for v in (await experiments.load()).variants} == {"control": 100, "challenger": 0}
    audit = [e.action for e in reversed(await rollouts.audit())]
    assert audit == ["start", "pause", "resume", "pause", "abort"], audit
