"""The Recommend request path.

validate → assign the variant → the user's features (one Redis round trip) → model inputs →
micro-batched Triton call → drop exclusions and purchases → answer, log the exposure.
Shoppers with at most `transitions_max_history` steps skip the model: the successors of their last item
(one more Redis read, no Triton call) topped up with popularity — not degraded, counted by source.
Everything is bounded by the client's deadline (without one, by `request_budget_ms`). Any failure behind the gateway becomes a degraded
answer that says why and what served it (model → transitions → popularity from Redis → popularity from
memory); only bad input and bad keys are errors.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass

import grpc
from tritonclient.utils import InferenceServerException

from vitrine.contracts.events import MAX_ID_LENGTH
from vitrine.contracts.exposures import INTERLEAVE, Exposure
from vitrine.services.features.store import FeatureStore, UserFeatures
from vitrine.services.gateway.batcher import DeadlineExpired, QueueFull
from vitrine.services.gateway.breaker import CircuitOpen
from vitrine.services.gateway.drift import DriftMonitor
from vitrine.services.gateway.experiment import Experiment, ExperimentFollower, Variant
from vitrine.services.gateway.interleaving import team_draft
from vitrine.services.gateway.exposures import ExposureLog
from vitrine.services.gateway.fallback import PopularityFallback, Ranked, steps, successors_then_popular
from vitrine.services.gateway.metrics import (
    SOURCE_INTERLEAVED, SOURCE_MEMORY, SOURCE_MODEL, SOURCE_POPULARITY, SOURCE_TRANSITIONS, SOURCE_TRENDING, GatewayMetrics,
)
from vitrine.services.gateway.ranking import POPULARITY_MODEL, ModelCatalog, RankerPool
from vitrine.services.throttled_log import ThrottledLog
from vitrine.settings import GatewaySettings
from vitrine.v1 import recommender_pb2 as pb
from vitrine.v1 import recommender_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:@/-]{1,%d}$" % MAX_ID_LENGTH)
MAX_PAGE = 64
MAX_ATTRIBUTES = 16
MAX_REQUEST_ID = 128
MAX_BATCH_REQUESTS = 64
COLD_START_MODEL = "trending"
FALLBACK_MODEL = POPULARITY_MODEL
TRANSITIONS_MODEL = "transitions"
"""The `model_name` of an answer served from the item → next-item table (degraded or for a short history)."""
INTERLEAVED_MODEL = "interleaved"
NO_EXPLANATIONS_MODEL = "model_without_explanations"
"""explanation_unavailable: the version serving was exported before explain_steps (the committed v1 models)."""
NO_EXPLANATIONS_NOT_MODEL = "not_ranked_by_a_model"
NO_EXPLANATIONS_DEGRADED = "degraded"


class InvalidRequest(ValueError):
    pass


@dataclass(frozen=True)
class Answer:
    items: Ranked
    model_name: str
    model_version: str
    degraded_reason: str = ""
    teams: tuple[str, ...] = ()
    """Interleaving: the variant that placed each item; empty in A/B mode."""
    source: str = SOURCE_MODEL
    """What produced the items (metrics.SOURCES): the `source` label of the answer and degraded counters."""
    explanations: dict[str, str] | None = None
    """Asked with explain and ranked by a model that has them: item → the history item that led to it."""


def validate(request: pb.RecommendRequest, max_k: int, max_exclusions: int) -> None:
    if not ID_PATTERN.match(request.user_id):
        raise InvalidRequest(f"user_id must be 1-{MAX_ID_LENGTH} characters of [A-Za-z0-9_.:@/-], got {request.user_id[:40]!r}")
    if not 1 <= request.k <= max_k:
        raise InvalidRequest(f"k must lie in 1..{max_k}, got {request.k}")
    if len(request.exclude_item_ids) > max_exclusions:
        raise InvalidRequest(f"at most {max_exclusions} exclude_item_ids, got {len(request.exclude_item_ids)}")
    for item in request.exclude_item_ids:
        if not ID_PATTERN.match(item):
            raise InvalidRequest(f"exclude_item_ids holds an invalid item id {item[:40]!r}")
    if len(request.request_id) > MAX_REQUEST_ID:
        raise InvalidRequest(f"request_id must be at most {MAX_REQUEST_ID} characters")
    context = request.context
    if len(context.page) > MAX_PAGE:
        raise InvalidRequest(f"context.page must be at most {MAX_PAGE} characters")
    if context.item_id and not ID_PATTERN.match(context.item_id):
        raise InvalidRequest(f"context.item_id is not a valid item id: {context.item_id[:40]!r}")
    if len(context.attributes) > MAX_ATTRIBUTES:
        raise InvalidRequest(f"context.attributes holds at most {MAX_ATTRIBUTES} entries")


class Rejected(Exception):
    """A request that gets an error status instead of an answer (after validation)."""

    def __init__(self, code: grpc.StatusCode, message: str, variant: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.variant = variant
        """The variant the request was assigned to, so that errors count per variant (guardrails)."""


@dataclass(frozen=True)
class _Reply:
    """An answer not yet delivered: the exposure is logged and the metrics counted only once it is."""

    response: pb.RecommendResponse
    exposure: Exposure
    answer: Answer
    variant: str
    elapsed_s: float


class RecommenderService(pb_grpc.RecommenderServicer):
    def __init__(
        self,
        settings: GatewaySettings,
        store: FeatureStore,
        experiment: ExperimentFollower,
        catalog: ModelCatalog,
        rankers: RankerPool,
        fallback: PopularityFallback,
        exposures: ExposureLog,
        metrics: GatewayMetrics,
        drift: DriftMonitor,
    ) -> None:
        self.settings = settings
        self.store = store
        self.experiment = experiment
        self.catalog = catalog
        self.rankers = rankers
        self.fallback = fallback
        self.exposures = exposures
        self.metrics = metrics
        self.drift = drift
        self._errors = ThrottledLog(log, settings.error_log_interval_s)

    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext) -> pb.RecommendResponse:  # noqa: N802
        method = "Recommend"
        try:
            validate(request, self.settings.max_k, self.settings.max_exclusions)
        except InvalidRequest as exc:
            self.metrics.requests.labels(method, "INVALID_ARGUMENT", "").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            reply = await self._reply(request, context.time_remaining())
        except Rejected as exc:
            self.metrics.requests.labels(method, exc.code.name, exc.variant).inc()
            await context.abort(exc.code, str(exc))
        self._deliver(method, reply)
        return reply.response

    async def RecommendBatch(self, request: pb.RecommendBatchRequest, context: grpc.aio.ServicerContext) -> pb.RecommendBatchResponse:  # noqa: N802
        """All or nothing: every sub-request is validated before any is answered, and if one cannot be
        answered the whole call fails with no exposure logged (the A/B data holds only what was delivered)."""
        method = "RecommendBatch"
        problem = None
        if not 1 <= len(request.requests) <= MAX_BATCH_REQUESTS:
            problem = f"requests must hold 1..{MAX_BATCH_REQUESTS} entries, got {len(request.requests)}"
        else:
            for index, sub in enumerate(request.requests):
                try:
                    validate(sub, self.settings.max_k, self.settings.max_exclusions)
                except InvalidRequest as exc:
                    problem = f"requests[{index}]: {exc}"
                    break
        if problem:
            self.metrics.requests.labels(method, "INVALID_ARGUMENT", "").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        remaining = context.time_remaining()
        outcomes = await asyncio.gather(*(self._reply(sub, remaining) for sub in request.requests), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                code = outcome.code if isinstance(outcome, Rejected) else grpc.StatusCode.INTERNAL
                self.metrics.requests.labels(method, code.name, getattr(outcome, "variant", "")).inc()
                if not isinstance(outcome, Rejected):
                    self._errors.log(logging.ERROR, "batch:internal", "RecommendBatch sub-request failed: %r", outcome)
                await context.abort(code, f"a sub-request could not be answered ({outcome}); none was")
        for reply in outcomes:
            self._deliver(method, reply)
        return pb.RecommendBatchResponse(responses=[reply.response for reply in outcomes])

    async def _reply(self, request: pb.RecommendRequest, time_remaining: float | None) -> _Reply:
        """Answer one validated request. `time_remaining` is the client's deadline (None: none); the model
        path is bounded by it or, without one, by `request_budget_ms`."""
        started = time.perf_counter()
        deadline = started + time_remaining if time_remaining is not None else None
        budget = deadline if deadline is not None else started + self.settings.request_budget_ms / 1000
        experiment = self.experiment.current
        variant = None if experiment.mode == INTERLEAVE else experiment.assign(request.user_id)
        variant_name = INTERLEAVE if variant is None else variant.name
        request_id = request.request_id or uuid.uuid4().hex
        self.metrics.inflight.inc()
        try:
            answer, features_ts_ms = await self._rank(request, experiment, variant, budget, request_id)
        except QueueFull as exc:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, "the gateway is at capacity; retry later", variant_name) from exc
        finally:
            self.metrics.inflight.dec()
        if deadline is not None and time.perf_counter() > deadline:
            raise Rejected(grpc.StatusCode.DEADLINE_EXCEEDED, "the client's deadline passed", variant_name)
        elapsed = time.perf_counter() - started
        exposure = Exposure(
            request_id=request_id, user_id=request.user_id, ts_ms=int(time.time() * 1000), variant=variant_name,
            model_name=answer.model_name, model_version=answer.model_version,
            item_ids=[i for i, _ in answer.items], scores=[s for _, s in answer.items], latency_ms=elapsed * 1000,
            degraded=bool(answer.degraded_reason), degraded_reason=answer.degraded_reason, page=request.context.page,
            experiment=experiment.name, revision=experiment.revision, mode=experiment.mode, slot_variants=list(answer.teams),
            features_ts_ms=features_ts_ms,
        )
        teams = answer.teams or ("",) * len(answer.items)
        response = pb.RecommendResponse(
            items=[pb.ScoredItem(item_id=i, score=s, variant=t) for (i, s), t in zip(answer.items, teams, strict=True)],
            variant=variant_name, model_name=answer.model_name, model_version=answer.model_version,
            degraded=bool(answer.degraded_reason), degraded_reason=answer.degraded_reason, request_id=request_id,
            features_ts_ms=features_ts_ms,
        )
        if request.explain:
            self._explain(response, answer)
        return _Reply(response, exposure, answer, variant_name, elapsed)

    @staticmethod
    def _explain(response: pb.RecommendResponse, answer: Answer) -> None:
        """Fill ScoredItem.explained_by, or say why there is no explanation."""
        if answer.explanations is not None:
            for item in response.items:
                item.explained_by = answer.explanations.get(item.item_id, "")
        elif answer.degraded_reason:
            response.explanation_unavailable = NO_EXPLANATIONS_DEGRADED
        elif answer.source in (SOURCE_MODEL, SOURCE_INTERLEAVED):
            response.explanation_unavailable = NO_EXPLANATIONS_MODEL
        else:
            response.explanation_unavailable = NO_EXPLANATIONS_NOT_MODEL

    def _deliver(self, method: str, reply: _Reply) -> None:
        self._observe(method, reply.variant, reply.answer, reply.elapsed_s)
        self.exposures.record(reply.exposure)

    async def _rank(self, request: pb.RecommendRequest, experiment: Experiment, variant: Variant | None, budget: float,
                    request_id: str) -> tuple[Answer, int]:
        """The answer, and the event time of the newest event in the user's features (0: none read).
        `variant` is None in interleave mode; `budget` is the perf_counter() instant past which the
        answer is degraded rather than late."""
        excluded = set(request.exclude_item_ids)
        if request.context.item_id:
            excluded.add(request.context.item_id)
        now_ms = int(time.time() * 1000)
        stage = time.perf_counter()
        try:
            async with asyncio.timeout(self._budget(self.settings.redis_timeout_ms / 1000, budget)):
                features: UserFeatures = await self.store.user_features(request.user_id, now_ms)
        except Exception as exc:  # noqa: BLE001 - Redis away or slow: answer from the in-memory copy
            log.debug("features unavailable: %s", exc)
            return await self._degraded(request.k, excluded, "redis_unavailable", last_item="", redis_up=False), 0
        finally:
            self.metrics.stage.labels("features").observe(time.perf_counter() - stage)
        excluded |= features.purchased
        fresh = features.recent[-1].ts_ms if features.recent else 0
        if not features.has_history:
            return Answer(self._top(self.fallback.trending(), request.k, excluded), COLD_START_MODEL, "", source=SOURCE_TRENDING), fresh
        history = steps(features.recent)
        if variant is not None and variant.model_name != POPULARITY_MODEL and len(history) <= self.settings.transitions_max_history:
            short = await self._short_history(request.k, history[-1], excluded, budget)
            if short is not None:
                return short, fresh
        if variant is None:
            a, b = experiment.variants
            answers = await asyncio.gather(*(self._by_model(request.k, v.name, v.model_name, v.model_version, features, excluded, budget,
                                                            request.explain)
                                             for v in (a, b)))
            degraded = next((x for x in answers if x.degraded_reason), None)
            if degraded is not None:  # no credit can be given for a list one team did not fill
                return degraded, fresh
            merged = team_draft(answers[0].items, answers[1].items, request.k, request_id, (a.name, b.name))
            explanations = None
            if request.explain and all(x.explanations is not None for x in answers):
                by_team = {a.name: answers[0].explanations, b.name: answers[1].explanations}
                explanations = {i: by_team[t][i] for i, _, t in merged if i in by_team[t]}  # the placing team's reason
            return Answer([(i, s) for i, s, _ in merged], INTERLEAVED_MODEL, "", teams=tuple(t for _, _, t in merged),
                          source=SOURCE_INTERLEAVED, explanations=explanations), fresh
        return await self._by_model(request.k, variant.name, variant.model_name, variant.model_version, features, excluded, budget,
                                    request.explain), fresh

    async def _by_model(self, k: int, variant: str, model_name: str, model_version: str, features: UserFeatures,
                        excluded: set[str], budget: float, explain: bool = False) -> Answer:
        """One model's top-k for a user with history (or popularity, when that is the variant's model)."""
        if model_name == POPULARITY_MODEL:
            popular, from_redis = await self.fallback.popular()
            return Answer(self._top(popular, k, excluded), POPULARITY_MODEL, "",
                          "" if from_redis else "redis_unavailable", source=SOURCE_POPULARITY if from_redis else SOURCE_MEMORY)
        last_item = features.recent[-1].item_id
        try:
            async with asyncio.timeout_at(self._loop_instant(budget)):
                model = await self.catalog.resolve(model_name, model_version)
            items, types = model.history(features.recent)
            row = (items, types, model.exclusions(excluded, self.settings.exclude_width), explain)
            ids, scores, steps = await self.rankers.batcher(model).submit(row, budget)
        except QueueFull:
            if self.settings.shed_mode == "reject":
                raise
            return await self._degraded(k, excluded, "overloaded", last_item)
        except CircuitOpen:
            return await self._degraded(k, excluded, "circuit_open", last_item)
        except (DeadlineExpired, TimeoutError):
            return await self._degraded(k, excluded, "deadline", last_item)
        except Exception as exc:  # noqa: BLE001 - Triton failing, slow, or the model not ready
            timed_out = isinstance(exc, InferenceServerException) and (exc.status() or "").endswith("DEADLINE_EXCEEDED")
            reason = "triton_timeout" if timed_out else "triton_unavailable"
            self._errors.log(logging.WARNING, f"model:{model_name}:{reason}", "model call to %s failed (%s): %s", model_name, reason, exc)
            return await self._degraded(k, excluded, reason, last_item)
        stage = time.perf_counter()
        ranked = self._top(model.decode(ids, scores), k, excluded)
        self.drift.observe(variant, model, items, ranked[0][1] if ranked else None)
        explanations = model.explanations(items, ids, steps) if steps is not None else None
        self.metrics.stage.labels("postprocess").observe(time.perf_counter() - stage)
        return Answer(ranked, model.name, model.version, explanations=explanations)

    async def _short_history(self, k: int, last_item: str, excluded: set[str], budget: float) -> Answer | None:
        """The transitions answer for a shopper with few steps, or None when the model should answer after
        all: the last item has no successor the shopper may see (the model knows more than popularity
        then), or Redis did not answer within its budget."""
        try:
            async with asyncio.timeout(self._budget(self.settings.redis_timeout_ms / 1000, budget)):
                successors = await self.store.successors(last_item, k + len(excluded))
        except Exception as exc:  # noqa: BLE001 - Redis slow or away: the model path decides
            log.debug("successors unavailable: %s", exc)
            return None
        items, from_table = successors_then_popular(successors, self.fallback.popular_copy, k, excluded | {last_item})
        return Answer(items, TRANSITIONS_MODEL, "", source=SOURCE_TRANSITIONS) if from_table else None

    async def _degraded(self, k: int, excluded: set[str], reason: str, last_item: str, redis_up: bool = True) -> Answer:
        """The model path failed (`reason`): successors of `last_item` topped up with popularity, read in one
        round trip; popularity alone when the item has none the shopper may see; the in-memory copy of
        popularity when Redis does not answer ("+redis_unavailable")."""
        if redis_up and last_item:
            try:
                successors, popular = await self.fallback.successors_and_popular(last_item, k + len(excluded))
            except Exception as exc:  # noqa: BLE001 - Redis away or slow as well
                log.debug("fallback read failed: %s", exc)
                return Answer(self._top(self.fallback.popular_copy, k, excluded), FALLBACK_MODEL, "",
                              f"{reason}+redis_unavailable", source=SOURCE_MEMORY)
            # The last item is never its own successor (a run on one item is one step): not shown back either.
            skip = excluded | {last_item}
            items, from_table = successors_then_popular(successors, popular, k, skip)
            if from_table:
                return Answer(items, TRANSITIONS_MODEL, "", reason, source=SOURCE_TRANSITIONS)
            return Answer(self._top(popular, k, skip), FALLBACK_MODEL, "", reason, source=SOURCE_POPULARITY)
        if redis_up:
            popular, from_redis = await self.fallback.popular()
            if not from_redis:
                reason = f"{reason}+redis_unavailable"
        else:
            popular, from_redis = self.fallback.popular_copy, False
        return Answer(self._top(popular, k, excluded), FALLBACK_MODEL, "", reason,
                      source=SOURCE_POPULARITY if from_redis else SOURCE_MEMORY)

    @staticmethod
    def _top(ranked: Ranked, k: int, excluded: set[str]) -> Ranked:
        out = []
        for item, score in ranked:
            if item not in excluded:
                out.append((item, score))
                if len(out) == k:
                    break
        return out

    @staticmethod
    def _budget(cap_s: float, deadline: float) -> float:
        return max(0.0, min(cap_s, deadline - time.perf_counter()))

    @staticmethod
    def _loop_instant(deadline: float) -> float:
        """A perf_counter() instant on the event loop's clock (asyncio.timeout_at)."""
        return asyncio.get_running_loop().time() + (deadline - time.perf_counter())

    def _observe(self, method: str, variant: str, answer: Answer, elapsed: float) -> None:
        self.metrics.requests.labels(method, "OK", variant).inc()
        self.metrics.duration.labels(variant, answer.model_version).observe(elapsed)
        self.metrics.answers.labels(answer.source, variant).inc()
        if answer.degraded_reason:
            self.metrics.degraded.labels(answer.degraded_reason, variant, answer.source).inc()
        elif answer.items and answer.source == SOURCE_MODEL:
            scores = [s for _, s in answer.items]
            self.metrics.top1.labels(variant, answer.model_version).observe(scores[0])
            self.metrics.mean_topk.labels(variant, answer.model_version).observe(sum(scores) / len(scores))
