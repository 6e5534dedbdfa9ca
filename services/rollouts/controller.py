"""The rollout loop: load the state, and when a running step's hold has elapsed, gather the window's figures, ask the
judge, act through the experiment store, audit. It keeps nothing in memory between ticks (the state is in Redis), so a
restarted controller continues where the last one stopped, and a person's `pause`/`abort` takes effect at the next tick.

Acting: the rollout's experiment has two arms, control (the experiment's first variant when the rollout started) and
the challenger, appended last. Variants own consecutive bucket ranges in listed order, so growing only the last
variant's weight moves buckets from control to the challenger and never back: a shopper who saw the challenger keeps
it at every later step. A rollback sets the challenger's weight to 0 (the variant stays listed, the experiment's
phase — one hypothesis, one α — goes on). Reaching the last step (100 %) marks the rollout completed.

TODO(issue 21 item 2): on completion set the registry's `champion` alias (`export/registry.py` `set_alias`) and keep
the previous champion as the fallback.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import redis.asyncio as aioredis

from vitrine.services.gateway.experiment import ConflictError, Experiment, ExperimentStore, Variant
from vitrine.services.gateway.figures import VariantFigures, variant_figures
from vitrine.services.rollouts import judge as judging
from vitrine.services.rollouts.metrics import RolloutMetrics
from vitrine.services.rollouts.store import (
    ABORTED,
    COMPLETED,
    FINISHED,
    PAUSED,
    ROLLED_BACK,
    RUNNING,
    AuditEntry,
    RolloutState,
    RolloutStore,
    StateConflict,
    now_ms,
)
from vitrine.settings import RolloutSettings, Settings

log = logging.getLogger("vitrine.rollouts")
CONTROLLER = "rollout-controller"
"""Who the controller's own changes are recorded as (experiment audit and rollout audit)."""
HOLDING = "holding: "
"""Prefix of `RolloutState.reason` while a step waits for enough traffic: a hold is audited once per step, not per tick."""
POPULARITY_MODEL = "popularity"
"""A variant that serves popularity from Redis needs no model in Triton (services/gateway/ranking.py)."""

Figures = Callable[[list[str], float], Awaitable[list[VariantFigures]]]
"""(variants, window seconds) → each variant's figures over the window ending now."""
Readiness = Callable[[str, str], Awaitable[bool]]
"""(model, version) → ready in Triton."""


class RolloutError(ValueError):
    """A rollout command that cannot be carried out as asked (the message says why)."""


def weights(experiment: Experiment | None) -> dict[str, int]:
    return {v.name: v.weight for v in experiment.variants} if experiment else {}


def split(experiment: Experiment, state: RolloutState, percent: int) -> Experiment:
    """The rollout's experiment with the challenger at `percent` and control at the rest (any other variant — one a
    person added — keeps its weight). Validated like any experiment: weights that cannot add up are an error."""
    others = sum(v.weight for v in experiment.variants if v.name not in (state.variant, state.control))
    missing = [name for name in (state.control, state.variant) if name not in weights(experiment)]
    if missing:
        raise RolloutError(f"the experiment has no variant {' or '.join(map(repr, missing))} (the rollout splits traffic between "
                           f"{state.control!r} and {state.variant!r})")
    control = 100 - percent - others
    if control < 0:
        raise RolloutError(f"other variants hold {others} %: the challenger cannot get {percent} %")
    variants = [v.model_copy(update={"weight": percent if v.name == state.variant else control if v.name == state.control else v.weight})
                for v in experiment.variants]
    return Experiment.model_validate({**experiment.model_dump(), "variants": [v.model_dump() for v in variants]})


def first_step(current: Experiment, state: RolloutState) -> Experiment:
    """The experiment a rollout starts with: control (the current first variant) and the challenger appended last, at the
    first step's share; the current experiment's other variants leave it."""
    control = next(v for v in current.variants if v.name == state.control)
    challenger = Variant(name=state.variant, model_name=state.model, model_version=state.version, weight=0)
    two_arms = Experiment.model_validate({**current.model_dump(), "variants": [{**control.model_dump(), "weight": 100}, challenger.model_dump()]})
    return split(two_arms, state, state.steps[0])


def window_s(state: RolloutState, cfg: RolloutSettings) -> float:
    """The window a step is judged over, and how long it lasts at least: its hold, or `min_window_s` if longer."""
    return max(state.hold_s, cfg.min_window_s)


def prometheus_figures(settings: Settings) -> Figures:
    async def figures(variants: list[str], seconds: float) -> list[VariantFigures]:
        return await variant_figures(settings.prometheus.url, variants, f"{math.ceil(seconds)}s", settings.rollouts.prometheus_timeout_s)
    return figures


def triton_readiness(settings: Settings) -> Readiness:
    async def ready(model: str, version: str) -> bool:
        if model == POPULARITY_MODEL:
            return True
        path = f"/v2/models/{model}/versions/{version}/ready" if version else f"/v2/models/{model}/ready"
        async with httpx.AsyncClient(base_url=settings.triton.http_url, timeout=settings.rollouts.triton_timeout_s) as client:
            return (await client.get(path)).status_code == 200
    return ready


async def start(experiments: ExperimentStore, store: RolloutStore, model: str, version: str, steps: tuple[int, ...], hold_s: float,
                by: str, variant: str = "challenger") -> RolloutState:
    """Route `steps[0]` % to the challenger (appended as `variant`, control = the experiment's first variant at the rest)."""
    current = await experiments.load()
    if current is None:
        raise RolloutError("no experiment is stored yet (start the stack: the gateway seeds one)")
    if current.mode != "ab":
        raise RolloutError(f"the experiment is in {current.mode} mode; a rollout routes A/B traffic (`vitrine ab set` it back to ab)")
    old = await store.load()
    if old is not None and old.status not in FINISHED:
        raise RolloutError(f"a rollout of {old.target} is {old.status} at {old.percent} %; abort it first")
    control = current.variants[0]
    if control.name == variant:
        raise RolloutError(f"the experiment's first variant is named {variant!r}, the name the challenger is served as; "
                           "rename it or set rollouts.variant")
    state = RolloutState(model=model, version=version, variant=variant, control=control.name, steps=steps, hold_s=hold_s,
                         step_started_ms=now_ms(), experiment_revision=0, started_by=by)
    planned = first_step(current, state)
    try:
        saved = await experiments.save(planned, by=f"{CONTROLLER} (start by {by})", expected_revision=current.revision)
    except ConflictError as exc:
        raise RolloutError(f"the experiment changed while the rollout started ({exc}); try again") from exc
    state = state.model_copy(update={"experiment_revision": saved.revision, "step_started_ms": now_ms()})
    dropped = [v.name for v in current.variants[1:]]
    entry = AuditEntry(by=by, at_ms=now_ms(), action="start", status=(old.status if old else "", RUNNING),
                       weights=(weights(current), weights(saved)), experiment_revision=saved.revision,
                       reasons=[f"rollout of {state.target} over steps {list(steps)} with {hold_s:g} s holds"]
                       + ([f"variants {dropped} left the experiment (a rollout compares control with the challenger)"] if dropped else []))
    try:
        return await store.save(state, entry, expected_revision=None)
    except StateConflict as exc:
        raise RolloutError(str(exc)) from exc


async def command(experiments: ExperimentStore, store: RolloutStore, action: str, by: str) -> RolloutState:
    """pause | resume | abort by a person: pause keeps the split; resume restarts the step's hold; abort routes 0 %."""
    state = await store.load()
    if state is None:
        raise RolloutError("no rollout has been started")
    allowed = {"pause": (RUNNING,), "resume": (PAUSED,), "abort": (RUNNING, PAUSED)}[action]
    if state.status not in allowed:
        raise RolloutError(f"the rollout of {state.target} is {state.status}: {action} applies to a rollout that is "
                           f"{' or '.join(allowed)}")
    new_status = {"pause": PAUSED, "resume": RUNNING, "abort": ABORTED}[action]
    update: dict[str, object] = {"status": new_status, "reason": f"{action} by {by}"}
    before = after = await experiments.load()
    if action == "resume":
        if before is None or before.revision != state.experiment_revision:
            raise RolloutError(f"the experiment is at revision {before.revision if before else 'none'}, not the rollout's "
                               f"{state.experiment_revision}: somebody changed the split; abort and start again")
        update["step_started_ms"] = now_ms()
    if action == "abort" and before is not None and weights(before).get(state.variant, 0) > 0:
        try:
            planned = split(before, state, 0)
        except RolloutError as exc:
            raise RolloutError(f"{exc}; set the split by hand (`vitrine ab set`) with the challenger at 0, then abort again") from exc
        after = await experiments.save(planned, by=f"{CONTROLLER} (abort by {by})", expected_revision=before.revision)
        update["experiment_revision"] = after.revision
    entry = AuditEntry(by=by, at_ms=now_ms(), action=action, status=(state.status, new_status),
                       weights=(weights(before), weights(after)), reasons=[f"{action} by {by}"],
                       experiment_revision=after.revision if after else 0)
    return await store.save(state.model_copy(update=update), entry, expected_revision=state.revision)


@dataclass
class Tick:
    """What one tick did (None verdict: nothing was due)."""

    state: RolloutState | None
    verdict: judging.Verdict | None = None


class RolloutController:
    """`tick()` is one pass; `run()` ticks every `rollouts.interval_s` until stopped. Figures and readiness are the real
    sources (Prometheus, Triton) unless given."""

    def __init__(self, settings: Settings, client: aioredis.Redis, metrics: RolloutMetrics | None = None,
                 figures: Figures | None = None, readiness: Readiness | None = None,
                 outcome_guardrails: Callable[[Experiment, str], Awaitable[list[judging.OutcomeGuardrail]]] | None = None) -> None:
        self.settings = settings
        self.cfg = settings.rollouts
        self.experiments = ExperimentStore(client, settings.features.namespace)
        self.store = RolloutStore(client, settings.features.namespace)
        self.client = client
        self.metrics = metrics
        self.figures = figures or prometheus_figures(settings)
        self.readiness = readiness or triton_readiness(settings)
        self.outcome_guardrails = outcome_guardrails or self._outcome_guardrails
        self.policy = judging.Policy.from_settings(self.cfg)

    async def _outcome_guardrails(self, experiment: Experiment, variant: str) -> list[judging.OutcomeGuardrail]:
        """The outcome monitor's non-inferiority tests for the challenger over the experiment's phase (one α for the
        whole ramp: weight-only revisions stay in one phase). None yet (too few users): no guardrail."""
        from vitrine.services.outcomes import looks
        from vitrine.services.outcomes.store import OutcomeStore

        look = await looks.take(OutcomeStore(self.client, self.settings.outcomes), self.experiments, experiment, self.settings.outcomes)
        if look.decision is None:
            return []
        return [judging.OutcomeGuardrail(g.metric, g.status, g.low, g.high, g.threshold)
                for g in look.decision.guardrails if g.variant == variant]

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except Exception as exc:  # noqa: BLE001 - Redis, Prometheus or Triton away: try again next interval
                log.warning("rollout tick failed: %s: %s", type(exc).__name__, exc)
                if self.metrics:
                    self.metrics.ticks_failed.inc()
            try:
                await asyncio.wait_for(stop.wait(), self.cfg.interval_s)
            except TimeoutError:
                pass

    async def tick(self) -> Tick:
        state = await self.store.load()
        if self.metrics:
            self.metrics.last_tick.set(now_ms() / 1000)
        if state is None:
            return Tick(None)
        if self.metrics:
            self.metrics.show(state.model, state.percent, state.status)
        if state.status != RUNNING:
            return Tick(state)
        experiment = await self.experiments.load()
        if experiment is None or experiment.revision != state.experiment_revision:
            return Tick(await self._pause_for_foreign_change(state, experiment))
        window = window_s(state, self.cfg)
        if now_ms() - state.step_started_ms < window * 1000:
            return Tick(state)  # judged once the step has lasted its window, so the window never reaches into the step before
        by_name = {f.variant: f for f in await self.figures([state.variant, state.control], window)}
        challenger, control = (self._arm(by_name.get(name), name, window) for name in (state.variant, state.control))
        ready = await self.readiness(state.model, state.version)
        outcomes = await self.outcome_guardrails(experiment, state.variant)
        verdict = judging.judge(challenger, control, ready, outcomes, self.policy)
        numbers = {**verdict.numbers, "window_s": window, "step_percent": state.percent}
        if verdict.action == judging.HOLD and state.reason.startswith(HOLDING):
            if self.metrics:  # still holding at this step: counted, audited once (at the step's first hold)
                self.metrics.decisions.labels(judging.HOLD).inc()
            return Tick(state, verdict)
        if verdict.action == judging.HOLD:
            state = await self._record(state, experiment, experiment, judging.HOLD, state.status, verdict.reasons, numbers,
                                       {"reason": HOLDING + "; ".join(verdict.reasons)})
        elif verdict.action == judging.ROLLBACK:
            rolled = await self.experiments.save(split(experiment, state, 0), by=f"{CONTROLLER} (rollback)", expected_revision=experiment.revision)
            state = await self._record(state, experiment, rolled, judging.ROLLBACK, ROLLED_BACK, verdict.reasons, numbers,
                                       {"experiment_revision": rolled.revision, "reason": "; ".join(verdict.reasons)})
        else:
            step = state.step + 1
            moved = await self.experiments.save(split(experiment, state, state.steps[step]), by=f"{CONTROLLER} (step {state.steps[step]} %)",
                                                expected_revision=experiment.revision)
            done = step == len(state.steps) - 1
            state = await self._record(state, experiment, moved, "complete" if done else judging.ADVANCE, COMPLETED if done else RUNNING,
                                       verdict.reasons, numbers, {"step": step, "step_started_ms": now_ms(),
                                                                  "experiment_revision": moved.revision,
                                                                  "reason": "reached 100 %" if done else ""})
        if self.metrics:
            self.metrics.last_decision.set(now_ms() / 1000)
            self.metrics.show(state.model, state.percent, state.status)
        return Tick(state, verdict)

    @staticmethod
    def _arm(figures: VariantFigures | None, name: str, window: float) -> judging.ArmFigures:
        if figures is None:
            return judging.ArmFigures(name, 0.0, math.nan, 0.0, 0.0)

        def ratio(value: float) -> float:  # a ratio over no requests (0/0 in PromQL) is no evidence: 0
            return 0.0 if math.isnan(value) else value

        return judging.ArmFigures(name, figures.requests_per_s * window, figures.p99_s, ratio(figures.error_ratio), ratio(figures.degraded_ratio))

    async def _pause_for_foreign_change(self, state: RolloutState, experiment: Experiment | None) -> RolloutState:
        reason = (f"the experiment is at revision {experiment.revision if experiment else 'none'}, not the rollout's "
                  f"{state.experiment_revision}: somebody else changed the split, so the rollout pauses (abort it and start again)")
        log.warning("rollout of %s: %s", state.target, reason)
        return await self._record(state, experiment, experiment, "pause", PAUSED, [reason], {}, {"reason": reason})

    async def _record(self, state: RolloutState, before: Experiment | None, after: Experiment | None, action: str, status: str,
                      reasons: list[str], numbers: dict, update: dict) -> RolloutState:
        entry = AuditEntry(by=CONTROLLER, at_ms=now_ms(), action=action, status=(state.status, status),
                           weights=(weights(before), weights(after)), reasons=reasons,
                           numbers={k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in numbers.items()},
                           experiment_revision=after.revision if after else 0)
        stored = await self.store.save(state.model_copy(update={"status": status, **update}), entry, expected_revision=state.revision)
        if self.metrics:
            self.metrics.decisions.labels(action).inc()
        log.info("rollout of %s: %s at %d %% → %s (%s)", state.target, action, state.percent, stored.status, "; ".join(reasons))
        return stored


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """`vitrine rollouts run`: the controller with its /metrics until `stop` is set."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    metrics = RolloutMetrics(registry)
    server, thread = start_http_server(settings.rollouts.metrics_port, settings.rollouts.metrics_host, registry=registry)
    client = aioredis.Redis(host=settings.redis.host, port=settings.redis.port, socket_connect_timeout=2, socket_timeout=10)
    try:
        await RolloutController(settings, client, metrics).run(stop)
    finally:
        await client.aclose()
        server.shutdown()
        thread.join(5)


def main(settings: Settings) -> None:
    import signal

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(run())
