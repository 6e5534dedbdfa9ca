"""A small client of the gateway's API, for the CLI, the demo, tests and load generation."""

from __future__ import annotations

import grpc

from vitrine.v1 import recommender_pb2 as pb
from vitrine.v1 import recommender_pb2_grpc as pb_grpc


class GatewayClient:
    def __init__(self, address: str, api_key: str | None, root_certificate: bytes | None = None) -> None:
        if root_certificate is not None:
            self.channel = grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificate))
        else:
            self.channel = grpc.aio.insecure_channel(address)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.recommender = pb_grpc.RecommenderStub(self.channel)
        self.admin = pb_grpc.ExperimentAdminStub(self.channel)

    async def recommend(self, user_id: str, k: int = 10, page: str = "", item_id: str = "",
                        exclude: list[str] | None = None, timeout_s: float = 1.0, request_id: str = "",
                        explain: bool = False) -> pb.RecommendResponse:
        request = pb.RecommendRequest(user_id=user_id, k=k, context=pb.Context(page=page, item_id=item_id),
                                      exclude_item_ids=exclude or [], request_id=request_id, explain=explain)
        return await self.recommender.Recommend(request, timeout=timeout_s, metadata=self.metadata)

    async def get_experiment(self, timeout_s: float = 5.0) -> pb.Experiment:
        return await self.admin.GetExperiment(pb.GetExperimentRequest(), timeout=timeout_s, metadata=self.metadata)

    async def set_experiment(self, experiment: pb.Experiment, expected_revision: int = 0, timeout_s: float = 10.0) -> pb.Experiment:
        request = pb.SetExperimentRequest(experiment=experiment, expected_revision=expected_revision)
        return await self.admin.SetExperiment(request, timeout=timeout_s, metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
