"""Writes a model folder of the Triton repository: both configs from one description, plus version folders.

Layout (one repository for production and for this CPU-only machine):

    <repo>/<model>/config.pbtxt          production: onnxruntime backend, KIND_GPU, dynamic batching
    <repo>/<model>/configs/cpu.pbtxt     python backend running the same model.onnx with onnxruntime
    <repo>/<model>/<version>/model.onnx
    <repo>/<model>/<version>/model.py    copy of export/triton_python_model.py

Both configs are generated from the same `ModelSpec` through Triton's own protobuf, so that their
tensors never disagree and a typo cannot produce a config Triton would reject at load time.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

PYTHON_MODEL_SOURCE = Path(__file__).with_name("triton_python_model.py")
CPU_CONFIG_NAME = "cpu"

_DTYPES = {
    np.dtype(np.float32): mc.TYPE_FP32,
    np.dtype(np.float16): mc.TYPE_FP16,
    np.dtype(np.int64): mc.TYPE_INT64,
    np.dtype(np.int32): mc.TYPE_INT32,
    np.dtype(np.bool_): mc.TYPE_BOOL,
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    dims: tuple[int, ...]
    """Shape without the batch axis; -1 for a variable axis."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 128
    preferred_batch_sizes: tuple[int, ...] = (8, 32, 64)
    max_queue_delay_us: int = 500
    keep_versions: int = 2
    gpu_instances: int = 1
    cpu_instances: int = 1
    tensorrt_fp16: bool = False
    """Offer TensorRT FP16 as an execution accelerator in the production config (GPU only)."""
    served_versions: tuple[int, ...] = ()
    """Empty: Triton serves the newest `keep_versions` (version policy `latest`). Otherwise exactly these (policy
    `specific`): the export sets it when a protected version (a registry alias, a pinned variant) is older than the
    newest `keep_versions`, so that the version `prune` keeps on disk is also one Triton serves."""
    warmup_batch_sizes: tuple[int, ...] = field(default=(1,))
    parameters: tuple[tuple[str, str], ...] = ()
    """Config `parameters` (key, string value) in both configs: e.g. where each version's metadata lives in the
    registry (`vitrine.metadata.<version>`), so that a client learns it from Triton's config API."""


def _tensors(container, specs: tuple[TensorSpec, ...]) -> None:  # noqa: ANN001 - protobuf repeated field
    for spec in specs:
        container.add(name=spec.name, data_type=_DTYPES[np.dtype(spec.dtype)], dims=list(spec.dims))


def _common(spec: ModelSpec) -> mc.ModelConfig:
    config = mc.ModelConfig(name=spec.name, max_batch_size=spec.max_batch_size)
    _tensors(config.input, spec.inputs)
    _tensors(config.output, spec.outputs)
    if spec.served_versions:
        config.version_policy.specific.versions.extend(sorted(spec.served_versions))
    else:
        config.version_policy.latest.num_versions = spec.keep_versions
    config.dynamic_batching.preferred_batch_size.extend(
        size for size in spec.preferred_batch_sizes if size <= spec.max_batch_size
    )
    config.dynamic_batching.max_queue_delay_microseconds = spec.max_queue_delay_us
    for key, value in spec.parameters:
        config.parameters[key].string_value = value
    for batch in spec.warmup_batch_sizes:
        warmup = config.model_warmup.add(name=f"warmup_batch_{batch}", batch_size=batch)
        for tensor in spec.inputs:
            dims = [1 if d < 0 else d for d in tensor.dims]
            warmup.inputs[tensor.name].CopyFrom(
                mc.ModelWarmup.Input(data_type=_DTYPES[np.dtype(tensor.dtype)], dims=dims, zero_data=True)
            )
    return config


def production_config(spec: ModelSpec) -> mc.ModelConfig:
    config = _common(spec)
    config.platform = "onnxruntime_onnx"
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=spec.gpu_instances)
    if spec.tensorrt_fp16:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters["precision_mode"] = "FP16"
    return config


def cpu_config(spec: ModelSpec) -> mc.ModelConfig:
    config = _common(spec)
    config.backend = "python"
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=spec.cpu_instances)
    return config


def render(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def write_model_folder(repository: Path, spec: ModelSpec) -> Path:
    """Write (or refresh) both configs of `spec.name`; version folders are added by `add_version`."""
    folder = repository / spec.name
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(render(production_config(spec)))
    (folder / "configs" / f"{CPU_CONFIG_NAME}.pbtxt").write_text(render(cpu_config(spec)))
    return folder


def config_parameters(folder: Path) -> dict[str, str]:
    """The string parameters of a model folder's production config (empty when there is none yet)."""
    path = folder / "config.pbtxt"
    if not path.is_file():
        return {}
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    return {key: value.string_value for key, value in config.parameters.items()}


def versions(folder: Path) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.exists() else []


def add_version(folder: Path, onnx_bytes: bytes, version: int | None = None, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a new version folder (next number unless given); an existing version is never overwritten.

    Files are written into a hidden temporary folder and renamed into place, so that a Triton polling
    the repository never sees a half-written version.
    """
    number = version if version is not None else (max(versions(folder), default=0) + 1)
    target = folder / str(number)
    if target.exists():
        raise FileExistsError(f"{target} exists; versions are immutable")
    staging = folder / f".staging-{number}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "model.onnx").write_bytes(onnx_bytes)
    shutil.copyfile(PYTHON_MODEL_SOURCE, staging / "model.py")
    for name, content in (extra_files or {}).items():
        (staging / name).write_bytes(content)
    staging.rename(target)
    return target


def prunable(on_disk: list[int], keep: int, protected: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """The versions `prune` removes: all but the newest `keep`, never one in `protected` (the registry's champion,
    challenger and fallback, versions the experiment pins), however old."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    return [v for v in sorted(on_disk)[:-keep] if v not in protected]


def prune(folder: Path, keep: int, protected: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Delete all but the newest `keep` versions and the `protected` ones; returns the removed version numbers."""
    removed = prunable(versions(folder), keep, protected)
    for number in removed:
        shutil.rmtree(folder / str(number))
    return removed


def withdraw(version_folder: Path) -> Path:
    """Take a version out of the repository (one that failed its check in Triton): renamed to a hidden
    `.rejected-<version>` beside it (Triton ignores folders whose names are not numbers; kept for inspection), and
    dropped from a `specific` version policy in every config of the model, which would otherwise name a version
    that is gone. Returns where it went."""
    folder, number = version_folder.parent, int(version_folder.name)
    target = folder / f".rejected-{number}"
    if target.exists():
        shutil.rmtree(target)
    version_folder.rename(target)
    for path in [folder / "config.pbtxt", *sorted((folder / "configs").glob("*.pbtxt"))]:
        if not path.is_file():
            continue
        config = text_format.Parse(path.read_text(), mc.ModelConfig())
        if config.version_policy.HasField("specific") and number in config.version_policy.specific.versions:
            kept = [v for v in config.version_policy.specific.versions if v != number]
            del config.version_policy.specific.versions[:]
            config.version_policy.specific.versions.extend(kept)
            path.write_text(render(config))
    return target
