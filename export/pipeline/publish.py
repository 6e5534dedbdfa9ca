"""Step 5, export and load: the accepted candidate becomes the next version in Triton's repository, is loaded
through the repository API and parity-checked in Triton (the same code as `vitrine export`).

Two halves, recorded separately: a run that crashed (or found Triton down) after writing the version loads
that same version when resumed, instead of writing another one."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from vitrine.export.onnx_export import export_run
from vitrine.export.serving_check import ServingMismatch, load_and_verify
from vitrine.export.triton_repository import withdraw


def write_version(run_dir: Path, repository: Path, model_name: str, max_k: int, keep_versions: int,
                  publish: Callable[[str, int, dict[str, bytes]], str] | None = None,
                  protected: frozenset[int] = frozenset()) -> dict:
    """ONNX + parity in-process + the next version folder (immutable, renamed into place); with `publish`, the
    version's files go to the registry first and its Triton config names their URI (the gateway reads it there).
    Pruning keeps the newest `keep_versions` and every `protected` version (aliases, pinned variants)."""
    result = export_run(run_dir, repository, name=model_name, max_k=max_k, keep_versions=keep_versions, publish=publish,
                        protected=protected)
    return {"model": result.model, "version": result.version, "folder": str(result.folder),
            "parity_max_abs_score_diff": result.max_abs_score_diff, "removed_versions": result.removed_versions,
            "loaded": False}


def load_version(exported: dict, grpc_url: str) -> dict:
    """Triton loads the model through its repository API and serves this version with onnxruntime's top-k.

    A version Triton serves differently from onnxruntime (ServingMismatch) is withdrawn before the step fails: its
    folder leaves the repository (renamed to a hidden `.rejected-<version>`, kept for inspection) and the model is
    reloaded without it, so no "newest" variant serves it and no later run takes it for the champion. Connection
    errors fail the step and leave the version in place: a resume loads it again."""
    folder = Path(exported["folder"])
    if not folder.is_dir():
        raise ServingMismatch(f"{folder} is not in the repository (withdrawn after a failed parity check?): start a new run")
    try:
        asyncio.run(load_and_verify(grpc_url, exported["model"], folder))
    except ServingMismatch as exc:
        where = withdraw(folder)
        asyncio.run(reload(grpc_url, exported["model"]))
        raise ServingMismatch(f"{exc}; version {folder.name} withdrawn (moved to {where}) and {exported['model']} "
                              "reloaded without it") from exc
    return {**exported, "loaded": True}


async def reload(grpc_url: str, model: str) -> None:
    import tritonclient.grpc.aio as triton

    client = triton.InferenceServerClient(grpc_url)
    try:
        await client.load_model(model)
    finally:
        await client.close()
