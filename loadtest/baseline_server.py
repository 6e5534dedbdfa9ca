"""A plain one-request-one-inference server, to show what the gateway's architecture buys.

It speaks the same `vitrine.v1.Recommender` API and reads the same features from Redis, but runs the
model with onnxruntime in-process for every request on its own: no micro-batching, no Triton, no A/B
routing, no fallback, no auth, no exposure log. It is the "model in a notebook behind gRPC" that
teams often start with; `vitrine bench` compares it with the gateway under the same load.
Run: `python -m vitrine.loadtest.baseline_server --model gru4rec --port 50199`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import grpc
import onnxruntime as ort
import redis.asyncio as aioredis

from vitrine.contracts import ranker
from vitrine.export.triton_repository import versions
from vitrine.loadtest.arguments import bounded_int
from vitrine.services.features.store import FeatureStore
from vitrine.services.gateway.ranking import ServedModel
from vitrine.settings import Settings
from vitrine.v1 import recommender_pb2 as pb
from vitrine.v1 import recommender_pb2_grpc as pb_grpc


class BaselineRecommender(pb_grpc.RecommenderServicer):
    def __init__(self, settings: Settings, model_name: str, threads: int) -> None:
        folder = settings.triton.model_repository / model_name
        version = str(versions(folder)[-1])
        self.model = ServedModel.load(settings.triton.model_repository, model_name, version)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(Path(folder) / version / "model.onnx"), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.store = FeatureStore(aioredis.Redis(host=settings.redis.host, port=settings.redis.port), settings.features)
        self.exclude_width = settings.gateway.exclude_width

    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext) -> pb.RecommendResponse:  # noqa: N802
        features = await self.store.user_features(request.user_id, int(time.time() * 1000))
        items, types = self.model.history(features.recent)
        excluded = set(request.exclude_item_ids) | features.purchased
        feed = {
            ranker.ITEM_IDS: items[None, :], ranker.EVENT_TYPES: types[None, :],
            ranker.EXCLUDE_IDS: self.model.exclusions(excluded, self.exclude_width)[None, :],
        }
        ids, scores = self.session.run(list(ranker.OUTPUTS), feed)  # on the event loop: one request at a time
        ranked = [(i, s) for i, s in self.model.decode(ids[0], scores[0]) if i not in excluded][: request.k]
        return pb.RecommendResponse(items=[pb.ScoredItem(item_id=i, score=s) for i, s in ranked], variant="baseline",
                                    model_name=self.model.name, model_version=self.model.version, request_id=request.request_id)


async def serve(settings: Settings, model: str, port: int, threads: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_RecommenderServicer_to_server(BaselineRecommender(settings, model, threads), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gru4rec", help="model folder in the repository")
    parser.add_argument("--port", type=bounded_int(1024, 65535), default=50199, metavar="PORT")
    parser.add_argument("--threads", type=bounded_int(1, 64), default=1, metavar="N", help="onnxruntime intra-op threads")
    args = parser.parse_args()
    asyncio.run(serve(Settings(), args.model, args.port, args.threads))


if __name__ == "__main__":
    main()
