"""The Recommend request path.

validate → assign the variant → the user's features (one Redis round trip) → model inputs →
micro-batched Triton call → drop exclusions and purchases → answer, log the exposure.
Everything is bounded by the client's deadline. Any failure behind the gateway becomes a degraded
answer that says why (popularity from Redis, else from memory); only bad input and bad keys are errors.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass

import grpc
from purgatory.domain.model import OpenedState

from vitrine.contracts.events import MAX_ID_LENGTH
from vitrine.contracts.exposures import Exposure
from vitrine.services.features.store import FeatureStore, UserFeatures
from vitrine.services.gateway.batcher import QueueFull
from vitrine.services.gateway.drift import DriftMonitor
from vitrine.services.gateway.experiment import ExperimentFollower
from vitrine.services.gateway.exposures import ExposureLog
from vitrine.services.gateway.fallback import PopularityFallback, Ranked
from vitrine.services.gateway.metrics import GatewayMetrics
from vitrine.services.gateway.ranking import ModelCatalog, RankerPool
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
FALLBACK_MODEL = "popularity"


class InvalidRequest(ValueError):
    pass


@dataclass(frozen=True)
class Answer:
    items: Ranked
    model_name: str
    model_version: str
    degraded_reason: str = ""


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

    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext) -> pb.RecommendResponse:  # noqa: N802
        return await self._answer(request, context, "Recommend")

    async def RecommendBatch(self, request: pb.RecommendBatchRequest, context: grpc.aio.ServicerContext) -> pb.RecommendBatchResponse:  # noqa: N802
        if not 1 <= len(request.requests) <= MAX_BATCH_REQUESTS:
            self.metrics.requests.labels("RecommendBatch", "INVALID_ARGUMENT", "").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"requests must hold 1..{MAX_BATCH_REQUESTS} entries")
        responses = await asyncio.gather(*(self._answer(r, context, "RecommendBatch") for r in request.requests))
        return pb.RecommendBatchResponse(responses=responses)

    async def _answer(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext, method: str) -> pb.RecommendResponse:
        started = time.perf_counter()
        try:
            validate(request, self.settings.max_k, self.settings.max_exclusions)
        except InvalidRequest as exc:
            self.metrics.requests.labels(method, "INVALID_ARGUMENT", "").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        remaining = context.time_remaining()
        deadline = started + remaining if remaining is not None else None
        variant = self.experiment.current.assign(request.user_id)
        self.metrics.inflight.inc()
        try:
            answer = await self._rank(request, variant.name, variant.model_name, variant.model_version, deadline)
        except QueueFull:
            self.metrics.requests.labels(method, "RESOURCE_EXHAUSTED", variant.name).inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the gateway is at capacity; retry later")
        finally:
            self.metrics.inflight.dec()
        if deadline is not None and time.perf_counter() > deadline:
            self.metrics.requests.labels(method, "DEADLINE_EXCEEDED", variant.name).inc()
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the client's deadline passed")
        request_id = request.request_id or uuid.uuid4().hex
        elapsed = time.perf_counter() - started
        self._observe(method, variant.name, answer, elapsed)
        self.exposures.record(Exposure(
            request_id=request_id, user_id=request.user_id, ts_ms=int(time.time() * 1000), variant=variant.name,
            model_name=answer.model_name, model_version=answer.model_version,
            item_ids=[i for i, _ in answer.items], scores=[s for _, s in answer.items], latency_ms=elapsed * 1000,
            degraded=bool(answer.degraded_reason), degraded_reason=answer.degraded_reason, page=request.context.page,
        ))
        return pb.RecommendResponse(
            items=[pb.ScoredItem(item_id=i, score=s) for i, s in answer.items], variant=variant.name,
            model_name=answer.model_name, model_version=answer.model_version,
            degraded=bool(answer.degraded_reason), degraded_reason=answer.degraded_reason, request_id=request_id,
        )

    async def _rank(self, request: pb.RecommendRequest, variant: str, model_name: str, model_version: str, deadline: float | None) -> Answer:
        excluded = set(request.exclude_item_ids)
        if request.context.item_id:
            excluded.add(request.context.item_id)
        now_ms = int(time.time() * 1000)
        stage = time.perf_counter()
        try:
            async with asyncio.timeout(self._budget(self.settings.redis_timeout_ms / 1000, deadline)):
                features: UserFeatures = await self.store.user_features(request.user_id, now_ms)
        except Exception as exc:  # noqa: BLE001 - Redis away or slow: answer from the in-memory copy
            log.debug("features unavailable: %s", exc)
            return await self._degraded(request.k, excluded, "redis_unavailable", redis_up=False)
        finally:
            self.metrics.stage.labels("features").observe(time.perf_counter() - stage)
        excluded |= features.purchased
        if not features.has_history:
            return Answer(self._top(self.fallback.trending(), request.k, excluded), COLD_START_MODEL, "")
        try:
            model = await self.catalog.resolve(model_name, model_version)
            items, types = model.history(features.recent)
            row = (items, types, model.exclusions(excluded, self.settings.exclude_width))
            ids, scores = await self.rankers.batcher(model).submit(row, deadline)
        except QueueFull:
            if self.settings.shed_mode == "reject":
                raise
            return await self._degraded(request.k, excluded, "overloaded")
        except OpenedState:
            return await self._degraded(request.k, excluded, "circuit_open")
        except Exception as exc:  # noqa: BLE001 - Triton failing, slow, or the model not ready
            log.debug("model call failed: %s", exc)
            reason = "triton_timeout" if "deadline" in str(exc).lower() else "triton_unavailable"
            return await self._degraded(request.k, excluded, reason)
        stage = time.perf_counter()
        ranked = self._top(model.decode(ids, scores), request.k, excluded)
        self.drift.observe(variant, model, items, ranked[0][1] if ranked else None)
        self.metrics.stage.labels("postprocess").observe(time.perf_counter() - stage)
        return Answer(ranked, model.name, model.version)

    async def _degraded(self, k: int, excluded: set[str], reason: str, redis_up: bool = True) -> Answer:
        if redis_up:
            popular, from_redis = await self.fallback.popular()
            if not from_redis:
                reason = f"{reason}+redis_unavailable"
        else:
            popular = self.fallback.popular_copy
        return Answer(self._top(popular, k, excluded), FALLBACK_MODEL, "", reason)

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
    def _budget(cap_s: float, deadline: float | None) -> float:
        return max(0.0, min(cap_s, deadline - time.perf_counter())) if deadline is not None else cap_s

    def _observe(self, method: str, variant: str, answer: Answer, elapsed: float) -> None:
        self.metrics.requests.labels(method, "OK", variant).inc()
        self.metrics.duration.labels(variant, answer.model_version).observe(elapsed)
        if answer.degraded_reason:
            self.metrics.degraded.labels(answer.degraded_reason, variant).inc()
        elif answer.items and answer.model_name not in (COLD_START_MODEL, FALLBACK_MODEL):
            scores = [s for _, s in answer.items]
            self.metrics.top1.labels(variant, answer.model_version).observe(scores[0])
            self.metrics.mean_topk.labels(variant, answer.model_version).observe(sum(scores) / len(scores))
