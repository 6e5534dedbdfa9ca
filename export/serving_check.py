"""Load an exported version into the running Triton and prove it serves what onnxruntime computes.

Triton runs in explicit model-control mode: a new version folder is served only after a repository
`load` call, which re-reads the model folder and applies its version policy. The check then asks for
that exact version with random histories (batches of 1, 7 and 64) and compares top-k ids and scores
with onnxruntime in-process on the same model.onnx.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc.aio as triton

from vitrine.contracts import ranker
from vitrine.export.onnx_export import SCORE_TOLERANCE, random_inputs

CHECK_BATCH_SIZES = (1, 7, 64)


class ServingMismatch(AssertionError):
    """Triton answered, but not what the exported graph computes."""


async def infer_ranker(client: triton.InferenceServerClient, model: str, version: int | None, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    inputs = []
    for name in ranker.INPUTS:
        tensor = triton.InferInput(name, list(feed[name].shape), "INT64")
        tensor.set_data_from_numpy(feed[name].astype(np.int64))
        inputs.append(tensor)
    result = await client.infer(
        model, inputs, model_version="" if version is None else str(version),
        outputs=[triton.InferRequestedOutput(name) for name in ranker.OUTPUTS],
    )
    return result.as_numpy(ranker.TOP_IDS), result.as_numpy(ranker.TOP_SCORES)


async def load_and_verify(grpc_url: str, model: str, version_folder: Path, seed: int = 1) -> None:
    """Load `model` (all versions its policy keeps) and check the version in `version_folder`."""
    version = int(version_folder.name)
    metadata = json.loads((version_folder / ranker.METADATA_FILE).read_text())
    max_len = int(metadata["serving"]["max_len"])
    vocabulary_rows = len(metadata["vocabulary"]) + int(metadata["serving"]["first_item_id"])
    session = ort.InferenceSession(str(version_folder / "model.onnx"), providers=["CPUExecutionProvider"])
    client = triton.InferenceServerClient(grpc_url)
    try:
        await client.load_model(model)
        if not await client.is_model_ready(model, str(version)):
            raise ServingMismatch(f"Triton did not make {model} v{version} ready after loading")
        rng = np.random.default_rng(seed)
        for batch in CHECK_BATCH_SIZES:
            feed = random_inputs(rng, batch, max_len, vocabulary_rows)
            served_ids, served_scores = await infer_ranker(client, model, version, feed)
            local_ids, local_scores = session.run(list(ranker.OUTPUTS), feed)
            if served_ids.shape != local_ids.shape:
                raise ServingMismatch(f"{model} v{version} batch {batch}: shape {served_ids.shape} != {local_ids.shape}")
            if not np.allclose(served_scores, local_scores, atol=SCORE_TOLERANCE, rtol=0):
                raise ServingMismatch(f"{model} v{version} batch {batch}: scores differ from onnxruntime in-process")
            # Different ids in a slot are fine only when the slot's scores tie (equal-scored items may swap).
            ties = np.isclose(served_scores, local_scores, atol=SCORE_TOLERANCE, rtol=0)
            if np.any((served_ids != local_ids) & ~ties):
                raise ServingMismatch(f"{model} v{version} batch {batch}: top-k ids differ from onnxruntime in-process")
    finally:
        await client.close()
