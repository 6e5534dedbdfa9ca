"""Step 5, export and load: the accepted candidate becomes the next version in Triton's repository, is loaded
through the repository API and parity-checked in Triton (the same code as `vitrine export`).

Two halves, recorded separately: a run that crashed (or found Triton down) after writing the version loads
that same version when resumed, instead of writing another one."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from vitrine.export.onnx_export import export_run
from vitrine.export.serving_check import load_and_verify


def write_version(run_dir: Path, repository: Path, model_name: str, max_k: int, keep_versions: int,
                  publish: Callable[[str, int, dict[str, bytes]], str] | None = None) -> dict:
    """ONNX + parity in-process + the next version folder (immutable, renamed into place); with `publish`, the
    version's files go to the registry first and its Triton config names their URI (the gateway reads it there)."""
    result = export_run(run_dir, repository, name=model_name, max_k=max_k, keep_versions=keep_versions, publish=publish)
    return {"model": result.model, "version": result.version, "folder": str(result.folder),
            "parity_max_abs_score_diff": result.max_abs_score_diff, "removed_versions": result.removed_versions,
            "loaded": False}


def load_version(exported: dict, grpc_url: str) -> dict:
    """Triton loads the model through its repository API and serves this version with onnxruntime's top-k."""
    asyncio.run(load_and_verify(grpc_url, exported["model"], Path(exported["folder"])))  # ServingMismatch / connection errors fail the step
    return {**exported, "loaded": True}
