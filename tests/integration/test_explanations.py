"""Explanations end to end on the real stack: a freshly trained model exported with `explain_steps`, served by
the test stack's Triton (CPU config, python backend running its model.onnx), asked through a gateway with
`explain=true`: every explained item names an item of that shopper's own history. The committed v1 model,
which lacks the output, keeps serving through the same gateway and says that it has no explanation.

The shopper's history is written with the feature store's own write path (the Lua script the feature consumer
runs) into a private namespace that only this test's gateway reads.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
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
from vitrine.export import model_card
from vitrine.export.pipeline.champion import find_champion
from vitrine.export.pipeline.evaluate import evaluate
from vitrine.export.registry import VERSION_TAG_CARD_URI, Registry
from vitrine.export.serving_check import upload_model, verify_served
from vitrine.export.train import TrainConfig, train
from vitrine.services.features.store import FeatureStore
from vitrine.services.gateway.client import GatewayClient
from vitrine.services.stack import Stack
from vitrine.services.stack.components import settings_env
from vitrine.settings import VariantSettings
from vitrine.v1 import recommender_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
STOREFRONT, EXPERIMENTER = "vitrine-demo-storefront", "vitrine-demo-experimenter"


@dataclass
class Exported:
    name: str
    vocabulary: tuple[str, ...]
    run_dir: Path
    folder: Path
    dataset: sequences.Dataset
    registry: Registry
    registered_version: str


@pytest.fixture
async def explaining_model(stack: Stack, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Exported]:
    """A small freshly trained ranker (gru4rec unless the test asks for another architecture), logged and registered in the stack's MLflow, exported with explain_steps (its
    metadata in the registry, as `vitrine export` does) and uploaded to Triton under a temporary name; unloaded at
    the end."""
    table = synthetic.generate(synthetic.preset("tiny"))
    dataset = sequences.build(table, max_len=20)
    architecture = getattr(request, "param", "gru4rec")
    run = train(TrainConfig(architecture=architecture, epochs=1, threads=1), dataset, {"fingerprint": table.fingerprint()},
                tmp_path, progress=False)
    name = f"test_explain_{uuid.uuid4().hex[:8]}"
    cfg = stack.settings.registry
    registry = await asyncio.to_thread(Registry, cfg.tracking_url, f"{cfg.experiment}-{name}", cfg.timeout_s)
    logged = await asyncio.to_thread(registry.log_training_run, run, "test_explanations")
    result = await asyncio.to_thread(onnx_export.export_run, run, tmp_path / "repository", name, 50, 1,
                                     registry.publisher(logged.run_id))
    assert onnx_export.has_explanations(result.folder / "model.onnx")
    registered = await asyncio.to_thread(registry.register_version, name, logged.run_id, result.version)
    client = triton.InferenceServerClient(stack.settings.triton.grpc_url)
    try:
        await upload_model(client, name, tmp_path / "repository" / name, stack.settings.triton.model_config_name)
        await verify_served(client, name, result.folder)
        config = await client.get_model_config(name, as_json=True)
        assert ranker.EXPLAIN_STEPS in [o["name"] for o in config["config"]["output"]]
        yield Exported(name, dataset.vocabulary.item_ids, run, result.folder, dataset, registry, registered.version)
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


@pytest.mark.parametrize("explaining_model", ["gru4rec", "sasrec"], indirect=True)
async def test_each_explained_item_names_a_step_of_the_shoppers_history(stack: Stack, explaining_model) -> None:
    name, vocabulary = explaining_model.name, explaining_model.vocabulary
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


async def test_the_model_card_is_logged_in_the_registry_with_every_section(stack: Stack, explaining_model: Exported) -> None:
    """The card of the registered version: evaluated against the served gru4rec champion on the same rows (the pipeline's
    evaluation), logged to the version's run in MLflow, printed by `vitrine models card`."""
    exported = explaining_model
    champion = await find_champion(stack.settings.triton.grpc_url, stack.settings.triton.model_repository, "gru4rec")
    assert champion is not None
    evaluation = {**await asyncio.to_thread(evaluate, exported.run_dir, exported.dataset, champion), "champion_version": champion.version}
    card = await asyncio.to_thread(model_card.build_from_folders, exported.run_dir, exported.folder,
                                   {"name": exported.name, "version": exported.registered_version,
                                    "triton_version": int(exported.folder.name), "run_id": None},
                                   evaluation)
    uri = await asyncio.to_thread(exported.registry.log_card, exported.name, exported.registered_version, model_card.card_files(card))
    version = await asyncio.to_thread(exported.registry.client.get_model_version, exported.name, exported.registered_version)
    assert version.tags[VERSION_TAG_CARD_URI] == uri and "Model card" in version.description
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "vitrine", "models", "card", exported.name, exported.registered_version],
        env={**os.environ, **settings_env(stack.settings)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    assert [line for line in text.splitlines() if line in model_card.SECTIONS] == list(model_card.SECTIONS)
    assert f"champion v{champion.version}" in text and "| popularity |" in text and "| transitions |" in text
    assert card["data"]["fingerprint"] in text
    # Explained examples: each explanation is an item of that example's own history.
    assert card["examples"]
    for example in card["examples"]:
        seen = {h["item"] for h in example["history"]}
        assert example["recommended"] and all(r["because_of"] in seen for r in example["recommended"])
    html = await asyncio.to_thread(exported.registry.card, exported.name, exported.registered_version, model_card.CARD_HTML)
    assert html.startswith(b"<!doctype html>") and b"<h2>By slice</h2>" in html
