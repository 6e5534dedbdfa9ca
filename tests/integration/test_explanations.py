"""Explanations end to end on the real stack: a freshly trained model exported with `explain_steps`, served by
the test stack's Triton (CPU config, python backend running its model.onnx), asked through a gateway with
`explain=true`: every explained item names an item of that shopper's own history. The committed v1 model,
which lacks the output, keeps serving through the same gateway and says that it has no explanation.

The shopper's history is written with the feature store's own write path (the Lua script the feature consumer
runs) into a private namespace that only this test's gateway reads.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException

from tests.integration.gateways import private_gateway
from tests.integration.invariants import eventually
from vitrine.contracts import ranker
from vitrine.contracts.events import Event, EventType
from vitrine.export import onnx_export
from vitrine.export.data import sequences, synthetic
from vitrine.export.serving_check import upload_model, verify_served
from vitrine.export.train import TrainConfig, train
from vitrine.services.features.store import FeatureStore
from vitrine.services.gateway.client import GatewayClient
from vitrine.services.stack import Stack
from vitrine.settings import VariantSettings
from vitrine.v1 import recommender_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
STOREFRONT, EXPERIMENTER = "vitrine-demo-storefront", "vitrine-demo-experimenter"


@pytest.fixture
async def explaining_model(stack: Stack, tmp_path: Path) -> AsyncIterator[tuple[str, tuple[str, ...]]]:
    """A small freshly trained gru4rec exported (with explain_steps) and uploaded to Triton under a temporary name;
    yields (name, vocabulary) and unloads it at the end."""
    table = synthetic.generate(synthetic.preset("tiny"))
    dataset = sequences.build(table, max_len=20)
    run = train(TrainConfig(architecture="gru4rec", epochs=1, threads=1), dataset, {"fingerprint": table.fingerprint()},
                tmp_path, progress=False)
    name = f"test-explain-{uuid.uuid4().hex[:8]}"
    result = onnx_export.export_run(run, tmp_path / "repository", name=name, max_k=50, keep_versions=1)
    assert onnx_export.has_explanations(result.folder / "model.onnx")
    client = triton.InferenceServerClient(stack.settings.triton.grpc_url)
    try:
        await upload_model(client, name, tmp_path / "repository" / name, stack.settings.triton.model_config_name)
        await verify_served(client, name, result.folder)
        config = await client.get_model_config(name, as_json=True)
        assert ranker.EXPLAIN_STEPS in [o["name"] for o in config["config"]["output"]]
        yield name, dataset.vocabulary.item_ids
    finally:
        try:
            await client.unload_model(name)
        except InferenceServerException:
            pass
        await client.close()


async def _write_history(stack: Stack, namespace: str, user: str, items: list[str]) -> None:
    client = aioredis.Redis(host=stack.settings.redis.host, port=stack.settings.redis.port)
    store = FeatureStore(client, stack.settings.features.model_copy(update={"namespace": namespace}))
    now_ms = int(time.time() * 1000)
    try:
        events = [Event(event_id=f"{user}-{n}", user_id=user, item_id=item, type=EventType.VIEW, ts_ms=now_ms - 1000 + n)
                  for n, item in enumerate(items)]
        written = await store.apply(events, group=f"test-{namespace}", next_offsets={})
        assert not written.refused and all(written.applied)
    finally:
        await client.aclose()


async def test_each_explained_item_names_a_step_of_the_shoppers_history(stack: Stack, explaining_model) -> None:
    name, vocabulary = explaining_model
    namespace = f"x{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(7)
    shoppers = {f"explain-{uuid.uuid4().hex[:6]}-{n}": [str(i) for i in rng.choice(vocabulary[:200], size=6, replace=False)]
                for n in range(5)}
    for user, history in shoppers.items():
        await _write_history(stack, namespace, user, history)
    solo = (VariantSettings(name="solo", model_name=name, weight=100),)
    async with private_gateway(stack.settings, namespace=namespace, default_variants=solo) as settings, \
            GatewayClient(settings.gateway.address, STOREFRONT) as storefront:
        for user, history in shoppers.items():
            async def explained(user: str = user) -> pb.RecommendResponse | None:
                reply = await storefront.recommender.Recommend(pb.RecommendRequest(user_id=user, k=10, explain=True),
                                                               timeout=10, metadata=storefront.metadata)
                return reply if reply.model_name == name and not reply.degraded else None

            # The first call may find the model not yet resolved by the new gateway: wait for the model's answer.
            reply = await eventually(explained, 30, f"a model answer for {user}")
            assert len(reply.items) == 10 and reply.explanation_unavailable == ""
            for item in reply.items:
                assert item.explained_by in history, f"{item.item_id} explained by {item.explained_by!r}, not in {history}"
            # Without the flag: the same items, no explanations.
            plain = await storefront.recommend(user, k=10, timeout_s=10)
            assert [i.item_id for i in plain.items] == [i.item_id for i in reply.items]
            assert not any(i.explained_by for i in plain.items) and plain.explanation_unavailable == ""

        # The committed v1 model lacks explain_steps: it keeps serving, and the answer says there is no explanation.
        async with GatewayClient(settings.gateway.address, EXPERIMENTER) as admin:
            await admin.set_experiment(pb.Experiment(name="default", salt="x", variants=[
                pb.Variant(name="solo", model_name="gru4rec", weight=100)]))
        user, history = next(iter(shoppers.items()))

        async def from_v1() -> pb.RecommendResponse | None:
            reply = await storefront.recommender.Recommend(pb.RecommendRequest(user_id=user, k=10, explain=True),
                                                           timeout=10, metadata=storefront.metadata)
            return reply if reply.model_name == "gru4rec" and not reply.degraded else None

        old = await eventually(from_v1, 30, "an answer from the committed gru4rec")
        assert len(old.items) == 10 and old.explanation_unavailable == "model_without_explanations"
        assert not any(i.explained_by for i in old.items)
        # A shopper without history gets trending: no model ranked it.
        cold = await storefront.recommender.Recommend(pb.RecommendRequest(user_id=f"cold-{uuid.uuid4().hex[:6]}", k=3, explain=True),
                                                      timeout=10, metadata=storefront.metadata)
        assert cold.model_name == "trending" and cold.explanation_unavailable == "not_ranked_by_a_model"
