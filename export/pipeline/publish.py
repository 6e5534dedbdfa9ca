"""Step 5, export and load: the accepted candidate becomes the next version in Triton's repository, is loaded
through the repository API and parity-checked in Triton (the same code as `vitrine export`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from vitrine.export.onnx_export import export_run
from vitrine.export.serving_check import load_and_verify


def publish(run_dir: Path, repository: Path, model_name: str, grpc_url: str, max_k: int, keep_versions: int) -> dict:
    result = export_run(run_dir, repository, name=model_name, max_k=max_k, keep_versions=keep_versions)
    asyncio.run(load_and_verify(grpc_url, model_name, result.folder))  # ServingMismatch / connection errors fail the step
    return {"model": result.model, "version": result.version, "folder": str(result.folder),
            "parity_max_abs_score_diff": result.max_abs_score_diff, "removed_versions": result.removed_versions,
            "loaded": True}
