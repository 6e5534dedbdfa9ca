"""ExperimentAdmin: read and change the A/B split at runtime (role experimenter or admin).

Every Redis call here is bounded by `admin_timeout_ms`: with Redis away an experimenter gets
UNAVAILABLE with a readable message at once, not a 4-second hang (redis-py's connect retries)
ending in UNKNOWN and a traceback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import grpc
import redis.asyncio as aioredis
from pydantic import ValidationError

from vitrine.contracts.exposures import AB
from vitrine.services.gateway.auth import identify
from vitrine.services.gateway.experiment import ConflictError, Experiment, ExperimentFollower, ExperimentStore, Variant
from vitrine.services.gateway.ranking import ModelCatalog
from vitrine.settings import GatewaySettings
from vitrine.v1 import recommender_pb2 as pb
from vitrine.v1 import recommender_pb2_grpc as pb_grpc

T = TypeVar("T")


def to_proto(experiment: Experiment) -> pb.Experiment:
    return pb.Experiment(
        name=experiment.name, salt=experiment.salt, revision=experiment.revision, updated_by=experiment.updated_by,
        updated_at_ms=experiment.updated_at_ms, mode=experiment.mode,
        variants=[pb.Variant(name=v.name, model_name=v.model_name, model_version=v.model_version, weight=v.weight) for v in experiment.variants],
    )


def from_proto(message: pb.Experiment) -> Experiment:
    return Experiment(
        name=message.name or "default", salt=message.salt, mode=message.mode or AB,
        variants=tuple(Variant(name=v.name, model_name=v.model_name, model_version=v.model_version, weight=v.weight) for v in message.variants),
    )


class ExperimentAdminService(pb_grpc.ExperimentAdminServicer):
    def __init__(self, settings: GatewaySettings, store: ExperimentStore, follower: ExperimentFollower, catalog: ModelCatalog) -> None:
        self.settings = settings
        self.store = store
        self.follower = follower
        self.catalog = catalog

    async def _redis(self, call: Awaitable[T], context: grpc.aio.ServicerContext) -> T:
        try:
            async with asyncio.timeout(self.settings.admin_timeout_ms / 1000):
                return await call
        except (TimeoutError, aioredis.RedisError, OSError) as exc:
            detail = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"the experiment store (Redis) is unavailable ({detail}); the split in force is unchanged, retry later")
            raise AssertionError("unreachable") from exc

    async def GetExperiment(self, request: pb.GetExperimentRequest, context: grpc.aio.ServicerContext) -> pb.Experiment:  # noqa: N802
        return to_proto((await self._redis(self.store.load(), context)) or self.follower.current)

    async def SetExperiment(self, request: pb.SetExperimentRequest, context: grpc.aio.ServicerContext) -> pb.Experiment:  # noqa: N802
        try:
            experiment = from_proto(request.experiment)
        except ValidationError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'experiment'}: {e['msg']}" for e in exc.errors(include_url=False)))
        not_ready = [f"{v.name}: {v.model_name}{':' + v.model_version if v.model_version else ''}"
                     for v in experiment.variants if not await self.catalog.is_ready(v.model_name, v.model_version)]
        if not_ready:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"models not ready in Triton: {', '.join(not_ready)}")
        caller = identify(context.invocation_metadata(), self.settings.accepted_keys)
        try:
            stored = await self._redis(
                self.store.save(experiment, by=caller.name if caller else "unknown", expected_revision=request.expected_revision), context)
        except ConflictError as exc:
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        try:
            async with asyncio.timeout(self.settings.admin_timeout_ms / 1000):
                await self.follower.refresh()
        except (TimeoutError, aioredis.RedisError, OSError):
            pass  # stored: pub/sub or the periodic re-read brings it to this gateway too
        return to_proto(stored)
