"""Load an exported version into the running Triton and prove it serves what onnxruntime computes.

Triton runs in explicit model-control mode: a new version folder is served only after a repository
`load` call, which re-reads the model folder and applies its version policy. The check then asks for
that exact version with random histories (batches of 1, 7 and 64) and compares top-k ids and scores
with onnxruntime in-process on the same model.onnx (ids by `topk.unexplained_id_differences`: another
id in a slot only where the two items' scores tie), and, when the model's config declares `explain_steps`,
the explanation steps of the items both returned.

`upload_model` loads a model folder that is not in Triton's repository (the files travel in the load
request, Triton keeps them in a temporary folder of its own): tests use it to serve a temporary model
without writing into the repository that Triton serves.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc.aio as triton
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from vitrine.contracts import ranker
from vitrine.export.onnx_export import SCORE_TOLERANCE, random_inputs
from vitrine.export.topk import unexplained_id_differences
from vitrine.export.triton_repository import versions

CHECK_BATCH_SIZES = (1, 7, 64)


class ServingMismatch(AssertionError):
    """Triton answered, but not what the exported graph computes."""


def ranker_inputs(feed: dict[str, np.ndarray]) -> list[triton.InferInput]:
    """A ranker's three INT64 inputs for Triton, from onnxruntime's feed."""
    inputs = []
    for name in ranker.INPUTS:
        tensor = triton.InferInput(name, list(feed[name].shape), "INT64")
        tensor.set_data_from_numpy(feed[name].astype(np.int64))
        inputs.append(tensor)
    return inputs


async def infer_ranker(client: triton.InferenceServerClient, model: str, version: int | None, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    result = await client.infer(
        model, ranker_inputs(feed), model_version="" if version is None else str(version),
        outputs=[triton.InferRequestedOutput(name) for name in ranker.OUTPUTS],
    )
    return result.as_numpy(ranker.TOP_IDS), result.as_numpy(ranker.TOP_SCORES)


async def upload_model(client: triton.InferenceServerClient, name: str, folder: Path, config_name: str = "") -> None:
    """Load the model folder `folder` (every version in it) into Triton as model `name`, files sent in the request.

    `config_name` is the config Triton runs with (`--model-config-name`): `configs/<name>.pbtxt`, or
    `config.pbtxt` when empty. Triton serves it until `client.unload_model(name)`; no repository on
    disk is read or written.
    """
    config_file = folder / "configs" / f"{config_name}.pbtxt" if config_name else folder / "config.pbtxt"
    config = text_format.Parse(config_file.read_text(), mc.ModelConfig())
    config.name = name
    files = {f"file:{path.relative_to(folder).as_posix()}": path.read_bytes()
             for version in versions(folder) for path in sorted((folder / str(version)).iterdir()) if path.is_file()}
    await client.load_model(name, config=json_format.MessageToJson(config), files=files)


async def load_and_verify(grpc_url: str, model: str, version_folder: Path, seed: int = 1) -> None:
    """Load `model` (all versions its policy keeps) from Triton's repository and check the version in `version_folder`."""
    client = triton.InferenceServerClient(grpc_url)
    try:
        await client.load_model(model)
        await verify_served(client, model, version_folder, seed)
    finally:
        await client.close()


async def verify_served(client: triton.InferenceServerClient, model: str, version_folder: Path, seed: int = 1) -> None:
    """Triton's `model` at the version of `version_folder` answers what onnxruntime computes from its model.onnx."""
    version = int(version_folder.name)
    metadata = json.loads((version_folder / ranker.METADATA_FILE).read_text())
    max_len = int(metadata["serving"]["max_len"])
    vocabulary_rows = len(metadata["vocabulary"]) + int(metadata["serving"]["first_item_id"])
    session = ort.InferenceSession(str(version_folder / "model.onnx"), providers=["CPUExecutionProvider"])
    if not await client.is_model_ready(model, str(version)):
        raise ServingMismatch(f"Triton did not make {model} v{version} ready after loading")
    config = await client.get_model_config(model, str(version), as_json=True)
    explains = ranker.declares_explain_steps(config.get("config", {}))
    rng = np.random.default_rng(seed)
    for batch in CHECK_BATCH_SIZES:
        feed = random_inputs(rng, batch, max_len, vocabulary_rows)
        served_ids, served_scores = await infer_ranker(client, model, version, feed)
        local_ids, local_scores = session.run(list(ranker.OUTPUTS), feed)
        if served_ids.shape != local_ids.shape:
            raise ServingMismatch(f"{model} v{version} batch {batch}: shape {served_ids.shape} != {local_ids.shape}")
        if not np.allclose(served_scores, local_scores, atol=SCORE_TOLERANCE, rtol=0):
            raise ServingMismatch(f"{model} v{version} batch {batch}: scores differ from onnxruntime in-process")
        bad = unexplained_id_differences(local_ids, local_scores, served_ids, SCORE_TOLERANCE)
        if np.any(bad):
            raise ServingMismatch(f"{model} v{version} batch {batch}: {int(bad.sum())} top-k ids differ from onnxruntime "
                                  "in-process without a tie")
        if explains:
            await _verify_explanations(client, model, version, batch, feed, session)


async def _verify_explanations(client: triton.InferenceServerClient, model: str, version: int, batch: int,
                               feed: dict[str, np.ndarray], session: ort.InferenceSession) -> None:
    """Triton's explain_steps are onnxruntime's for the same items: the same history position, or one holding the same
    item (an exact tie); -1 exactly where onnxruntime has -1."""
    result = await client.infer(model, ranker_inputs(feed), model_version=str(version),
                                outputs=[triton.InferRequestedOutput(name) for name in ranker.EXPLAINED_OUTPUTS])
    served_ids, served_steps = result.as_numpy(ranker.TOP_IDS), result.as_numpy(ranker.EXPLAIN_STEPS)
    local_ids, _, local_steps = session.run(list(ranker.EXPLAINED_OUTPUTS), feed)
    history = feed[ranker.ITEM_IDS]
    for row, col in zip(*np.nonzero((served_ids == local_ids) & (served_steps != local_steps)), strict=True):
        got, want = int(served_steps[row, col]), int(local_steps[row, col])
        if min(got, want) < 0 or got >= history.shape[1] or history[row, got] != history[row, want]:
            raise ServingMismatch(f"{model} v{version} batch {batch}: explain_steps differ from onnxruntime in-process "
                                  f"(row {row}, slot {col}: {got} vs {want})")
