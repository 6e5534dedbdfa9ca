"""ExperimentAdmin: read and change the A/B split at runtime (role experimenter or admin)."""

from __future__ import annotations

import grpc
from pydantic import ValidationError

from vitrine.services.gateway.auth import identify
from vitrine.services.gateway.experiment import ConflictError, Experiment, ExperimentFollower, ExperimentStore, Variant
from vitrine.services.gateway.ranking import ModelCatalog
from vitrine.settings import GatewaySettings
from vitrine.v1 import recommender_pb2 as pb
from vitrine.v1 import recommender_pb2_grpc as pb_grpc


def to_proto(experiment: Experiment) -> pb.Experiment:
    return pb.Experiment(
        name=experiment.name, salt=experiment.salt, revision=experiment.revision, updated_by=experiment.updated_by,
        updated_at_ms=experiment.updated_at_ms,
        variants=[pb.Variant(name=v.name, model_name=v.model_name, model_version=v.model_version, weight=v.weight) for v in experiment.variants],
    )


def from_proto(message: pb.Experiment) -> Experiment:
    return Experiment(
        name=message.name or "default", salt=message.salt,
        variants=tuple(Variant(name=v.name, model_name=v.model_name, model_version=v.model_version, weight=v.weight) for v in message.variants),
    )


class ExperimentAdminService(pb_grpc.ExperimentAdminServicer):
    def __init__(self, settings: GatewaySettings, store: ExperimentStore, follower: ExperimentFollower, catalog: ModelCatalog) -> None:
        self.settings = settings
        self.store = store
        self.follower = follower
        self.catalog = catalog

    async def GetExperiment(self, request: pb.GetExperimentRequest, context: grpc.aio.ServicerContext) -> pb.Experiment:  # noqa: N802
        return to_proto((await self.store.load()) or self.follower.current)

    async def SetExperiment(self, request: pb.SetExperimentRequest, context: grpc.aio.ServicerContext) -> pb.Experiment:  # noqa: N802
        try:
            experiment = from_proto(request.experiment)
        except ValidationError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(e["msg"] for e in exc.errors(include_url=False)))
        not_ready = [f"{v.name}: {v.model_name}{':' + v.model_version if v.model_version else ''}"
                     for v in experiment.variants if not await self.catalog.is_ready(v.model_name, v.model_version)]
        if not_ready:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"models not ready in Triton: {', '.join(not_ready)}")
        caller = identify(context.invocation_metadata(), self.settings.api_keys)
        try:
            stored = await self.store.save(experiment, by=caller.name if caller else "unknown", expected_revision=request.expected_revision)
        except ConflictError as exc:
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        await self.follower.refresh()
        return to_proto(stored)
