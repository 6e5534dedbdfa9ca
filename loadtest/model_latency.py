"""`vitrine bench models`: what one inference costs in-process and through Triton, per batch size.

Closed-loop, one request at a time, the two paths alternating call by call, so that the figures are the service time of a call, not queueing:
onnxruntime in-process (same model.onnx, one intra-op thread like each Triton instance) against a
gRPC call to Triton's CPU config (python backend running onnxruntime). The difference is what Triton's
transport and the python-backend hop cost; the batch sizes show how well batching amortises it.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as triton_grpc

from vitrine.contracts import ranker
from vitrine.export.onnx_export import random_inputs
from vitrine.export.triton_repository import versions
from vitrine.settings import Settings

BATCH_SIZES = (1, 8, 32, 128)


@dataclass(frozen=True)
class Measurement:
    model: str
    path: str
    batch_size: int
    calls: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    per_item_us: float


def _measure_pair(first: Callable[[], object], second: Callable[[], object], calls: int, warmup: int) -> tuple[np.ndarray, np.ndarray]:
    """Alternate the two calls, so that both see the same machine state (frequency, caches, neighbours)."""
    for _ in range(warmup):
        first()
        second()
    samples = np.empty((2, calls))
    for i in range(calls):
        for j, call in enumerate((first, second)):
            start = time.perf_counter()
            call()
            samples[j, i] = time.perf_counter() - start
    return samples[0] * 1000, samples[1] * 1000


def _summary(model: str, path: str, batch: int, samples_ms: np.ndarray) -> Measurement:
    return Measurement(
        model=model, path=path, batch_size=batch, calls=len(samples_ms),
        p50_ms=float(np.percentile(samples_ms, 50)), p99_ms=float(np.percentile(samples_ms, 99)),
        mean_ms=float(samples_ms.mean()), per_item_us=float(samples_ms.mean() * 1000 / batch),
    )


def bench_model(settings: Settings, model: str, calls: int, warmup: int, seed: int = 0) -> list[Measurement]:
    folder = settings.triton.model_repository / model
    version_dir = folder / str(versions(folder)[-1])
    metadata = json.loads((version_dir / ranker.METADATA_FILE).read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(version_dir / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"])
    client = triton_grpc.InferenceServerClient(settings.triton.grpc_url)
    rng = np.random.default_rng(seed)
    results = []
    try:
        for batch in BATCH_SIZES:
            feed = random_inputs(rng, batch, metadata["serving"]["max_len"], len(metadata["vocabulary"]) + 2)
            inputs = []
            for name in ranker.INPUTS:
                tensor = triton_grpc.InferInput(name, list(feed[name].shape), "INT64")
                tensor.set_data_from_numpy(feed[name])
                inputs.append(tensor)
            outputs = [triton_grpc.InferRequestedOutput(name) for name in ranker.OUTPUTS]
            n = max(20, calls // max(1, batch // 8))
            local, served = _measure_pair(
                lambda: session.run(list(ranker.OUTPUTS), feed),
                lambda: client.infer(model, inputs, model_version=version_dir.name, outputs=outputs),
                n, warmup,
            )
            results += [_summary(model, "onnxruntime in-process", batch, local), _summary(model, "Triton gRPC (CPU config)", batch, served)]
    finally:
        client.close()
    return results


def render_markdown(results: list[Measurement]) -> str:
    lines = [
        "| model | batch | onnxruntime p50 / p99 ms | Triton p50 / p99 ms | Triton ÷ in-process (p50) | Triton µs per item |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_key = {(m.model, m.batch_size, m.path.startswith("Triton")): m for m in results}
    for model in dict.fromkeys(m.model for m in results):
        for batch in BATCH_SIZES:
            local, served = by_key[(model, batch, False)], by_key[(model, batch, True)]
            lines.append(
                f"| {model} | {batch} | {local.p50_ms:.3f} / {local.p99_ms:.3f} | {served.p50_ms:.3f} / {served.p99_ms:.3f} "
                f"| {served.p50_ms / local.p50_ms:.1f}× | {served.per_item_us:.0f} |"
            )
    return "\n".join(lines)


def run(settings: Settings, models: list[str], calls: int, warmup: int, out: Path | None) -> str:
    results = [m for model in models for m in bench_model(settings, model, calls, warmup)]
    table = render_markdown(results)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": platform.platform(), "results": [asdict(m) for m in results]}, indent=2))
    return table
