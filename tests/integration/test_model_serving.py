"""Trained rankers, exported and served by the real Triton (CPU config), agree with onnxruntime in-process."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as triton

from vitrine.contracts import ranker
from vitrine.export import onnx_export
from vitrine.export.data import sequences, synthetic
from vitrine.export.serving_check import infer_ranker, load_and_verify
from vitrine.export.train import TrainConfig, train
from vitrine.export.triton_repository import versions
from vitrine.services.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
MODELS = ("gru4rec", "sasrec")


@pytest.fixture
async def client(stack: Stack):
    client = triton.InferenceServerClient(stack.settings.triton.grpc_url)
    yield client
    await client.close()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("batch_size", [1, 7, 64])
async def test_shipped_models_serve_the_same_top_k_as_onnxruntime(stack: Stack, client, model: str, batch_size: int) -> None:
    folder = stack.settings.triton.model_repository / model
    newest = folder / str(versions(folder)[-1])
    metadata = json.loads((newest / ranker.METADATA_FILE).read_text())
    session = ort.InferenceSession(str(newest / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = onnx_export.random_inputs(np.random.default_rng(batch_size), batch_size, metadata["serving"]["max_len"],
                                     len(metadata["vocabulary"]) + sequences.FIRST_ITEM)
    served_ids, served_scores = await infer_ranker(client, model, None, feed)
    local_ids, local_scores = session.run(list(ranker.OUTPUTS), feed)
    assert served_ids.shape == (batch_size, metadata["serving"]["max_k"])
    np.testing.assert_allclose(served_scores, local_scores, atol=1e-4, rtol=0)
    ties = np.isclose(served_scores, local_scores, atol=1e-4)
    assert not np.any((served_ids != local_ids) & ~ties)


async def test_train_then_export_adds_a_served_verified_version(stack: Stack, tmp_path: Path, client) -> None:
    table = synthetic.generate(synthetic.preset("tiny"))
    dataset = sequences.build(table, max_len=20)
    repository = stack.settings.triton.model_repository
    for model in MODELS:
        run = train(TrainConfig(architecture=model, epochs=1), dataset, {"fingerprint": table.fingerprint()}, tmp_path, progress=False)
        before = versions(repository / model)
        result = onnx_export.export_run(run, repository, max_k=50, keep_versions=3)
        assert result.version == before[-1] + 1
        await load_and_verify(stack.settings.triton.grpc_url, model, result.folder)
        assert await client.is_model_ready(model, str(result.version))
        # The version it replaced as newest is still served (the policy keeps 3), so pinned variants keep working.
        assert await client.is_model_ready(model, str(before[-1]))
