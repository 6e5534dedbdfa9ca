"""Trained rankers, exported and served by the real Triton (CPU config), agree with onnxruntime in-process.

No test writes into the repository Triton serves (in a reused stack that is the checked-in
`model_repository/`): the shipped models are only read, and a new export goes into a temporary
repository and is served under a temporary model name whose files travel in Triton's load request
(`serving_check.upload_model`); the model is unloaded at the end. Only `vitrine export`'s own path
(a new model folder in the served repository, loaded from there) writes into the served repository, under
a temporary name that it removes again, and only when that repository is the test stack's copy.
"""

import json
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException

from vitrine.contracts import ranker
from vitrine.export import onnx_export
from vitrine.export.data import sequences, synthetic
from vitrine.export.serving_check import infer_ranker, load_and_verify, upload_model, verify_served
from vitrine.export.topk import unexplained_id_differences
from vitrine.export.train import TrainConfig, train
from vitrine.export.triton_repository import versions
from vitrine.services.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
MODELS = ("gru4rec", "sasrec")
CHECKED_IN_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(stack.settings.triton.grpc_url)
    yield client
    await client.close()


@pytest.fixture
async def temporary_models(client: triton.InferenceServerClient) -> AsyncIterator[Callable[[str], str]]:
    """Names for models this test uploads to Triton; every one of them is unloaded at the end."""
    names: list[str] = []

    def name(model: str) -> str:
        names.append(f"test-{model}-{uuid.uuid4().hex[:8]}")
        return names[-1]

    yield name
    for uploaded in names:
        try:
            await client.unload_model(uploaded)
        except InferenceServerException:  # never loaded: the test failed before its upload
            pass
        assert not await client.is_model_ready(uploaded)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("batch_size", [1, 7, 64])
async def test_shipped_models_serve_the_same_top_k_as_onnxruntime(stack: Stack, client, model: str, batch_size: int) -> None:
    folder = stack.settings.triton.model_repository / model
    version = versions(folder)[-1]
    newest = folder / str(version)
    assert await client.is_model_ready(model, str(version))
    metadata = json.loads((newest / ranker.METADATA_FILE).read_text())
    session = ort.InferenceSession(str(newest / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = onnx_export.random_inputs(np.random.default_rng(batch_size), batch_size, metadata["serving"]["max_len"],
                                     len(metadata["vocabulary"]) + sequences.FIRST_ITEM)
    served_ids, served_scores = await infer_ranker(client, model, version, feed)
    local_ids, local_scores = session.run(list(ranker.OUTPUTS), feed)
    assert served_ids.shape == (batch_size, metadata["serving"]["max_k"])
    np.testing.assert_allclose(served_scores, local_scores, atol=onnx_export.SCORE_TOLERANCE, rtol=0)
    wrong = unexplained_id_differences(local_ids, local_scores, served_ids, onnx_export.SCORE_TOLERANCE)
    assert not wrong.any(), f"Triton's ids {served_ids[wrong]} where onnxruntime has {local_ids[wrong]}"


async def test_train_then_export_adds_a_served_verified_version(stack: Stack, tmp_path: Path, client, temporary_models) -> None:
    table = synthetic.generate(synthetic.preset("tiny"))
    dataset = sequences.build(table, max_len=20)
    repository = tmp_path / "repository"
    for model in MODELS:
        name = temporary_models(model)
        # The shipped model folder, copied (read only) under the temporary name: the export adds the next version.
        shutil.copytree(stack.settings.triton.model_repository / model, repository / name, ignore=shutil.ignore_patterns("__pycache__"))
        before = versions(repository / name)
        run = train(TrainConfig(architecture=model, epochs=1), dataset, {"fingerprint": table.fingerprint()}, tmp_path, progress=False)
        # export_run is the ungated path (the gate lives in `vitrine export`): this one-epoch tiny model would
        # rightly lose to the baselines; here only the export and serving path is under test.
        result = onnx_export.export_run(run, repository, name=name, max_k=50, keep_versions=3)
        assert result.version == before[-1] + 1
        await upload_model(client, name, repository / name, stack.settings.triton.model_config_name)
        await verify_served(client, name, result.folder)
        assert await client.is_model_ready(name, str(result.version))
        # The model card carries every baseline beside the model's metrics.
        card = json.loads((result.folder / ranker.METADATA_FILE).read_text())
        assert set(card["baselines"]["metrics"]) == {"popularity", "transitions", "cooccurrence"}
        # The version it replaced as newest is still served (the policy keeps 3), so pinned variants keep working.
        assert await client.is_model_ready(name, str(before[-1]))


async def test_an_export_into_the_served_repository_is_loaded_from_there(stack: Stack, tmp_path: Path, client, temporary_models) -> None:
    """`vitrine export`'s path: the next version written into Triton's repository, loaded by a repository `load`."""
    repository = stack.settings.triton.model_repository
    if repository.resolve() == CHECKED_IN_REPOSITORY:
        pytest.skip("the stack serves the checked-in model_repository/, which tests never write into")
    table = synthetic.generate(synthetic.preset("tiny"))
    run = train(TrainConfig(architecture="gru4rec", epochs=1), sequences.build(table, max_len=20), {"fingerprint": table.fingerprint()},
                tmp_path, progress=False)
    name = temporary_models("gru4rec")
    try:
        first = onnx_export.export_run(run, repository, name=name, max_k=50, keep_versions=3)
        await load_and_verify(stack.settings.triton.grpc_url, name, first.folder)
        second = onnx_export.export_run(run, repository, name=name, max_k=50, keep_versions=3)
        await load_and_verify(stack.settings.triton.grpc_url, name, second.folder)
        assert (first.version, second.version) == (1, 2)
        assert await client.is_model_ready(name, "1") and await client.is_model_ready(name, "2")
    finally:
        shutil.rmtree(repository / name, ignore_errors=True)
