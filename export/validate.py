"""Checks a model folder of the repository before Triton is asked to serve it.

Triton itself would load a broken folder and report it UNAVAILABLE with a terse reason, or, worse,
load a config whose shapes disagree with the ONNX graph and fail on the first request. These checks
run at export time and before `vitrine stack up` starts Triton, and say exactly what is wrong.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from vitrine.contracts import ranker
from vitrine.export.triton_repository import CPU_CONFIG_NAME, versions

_ONNX_TYPES = {
    "tensor(float)": mc.TYPE_FP32,
    "tensor(float16)": mc.TYPE_FP16,
    "tensor(int64)": mc.TYPE_INT64,
    "tensor(int32)": mc.TYPE_INT32,
    "tensor(bool)": mc.TYPE_BOOL,
}


class ModelFolderError(ValueError):
    """A model folder that Triton must not be asked to serve; the message names the file and the problem."""


def _read_config(path: Path) -> mc.ModelConfig:
    if not path.is_file():
        raise ModelFolderError(f"{path} is missing")
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except text_format.ParseError as exc:
        raise ModelFolderError(f"{path} is not a valid Triton model config: {exc}") from exc


OPTIONAL_OUTPUTS = frozenset({ranker.EXPLAIN_STEPS})


def _check_tensors(kind: str, config_tensors, onnx_tensors, batched: bool, where: str) -> list[str]:  # noqa: ANN001
    problems = []
    by_name = {t.name: t for t in onnx_tensors}
    configured = {t.name for t in config_tensors}
    for extra in sorted(set(by_name) - configured):
        # An optional output a model config may leave out (declared only once every version has it): Triton's
        # onnxruntime backend and the python-backend runner run only the outputs the config names.
        if kind == "output" and extra in OPTIONAL_OUTPUTS:
            continue
        problems.append(f"ONNX {kind} {extra!r} is not in the config")
    for tensor in config_tensors:
        graph = by_name.get(tensor.name)
        if graph is None:
            problems.append(f"config {kind} {tensor.name!r} is not in {where}")
            continue
        if _ONNX_TYPES.get(graph.type) != tensor.data_type:
            problems.append(
                f"{kind} {tensor.name!r}: config type {mc.DataType.Name(tensor.data_type)}, ONNX {graph.type}"
            )
        onnx_dims = list(graph.shape[1:] if batched else graph.shape)
        config_dims = list(tensor.dims)
        fits = len(onnx_dims) == len(config_dims) and all(
            c == -1 or not isinstance(o, int) or o == c for c, o in zip(config_dims, onnx_dims)
        )
        if not fits:
            problems.append(f"{kind} {tensor.name!r}: config dims {config_dims}, ONNX shape {list(graph.shape)}")
    return problems


def validate_model_folder(folder: Path) -> list[int]:
    """Raise `ModelFolderError` listing every problem; return the version numbers that are fine."""
    production = _read_config(folder / "config.pbtxt")
    cpu = _read_config(folder / "configs" / f"{CPU_CONFIG_NAME}.pbtxt")
    problems = []
    for config, path in ((production, "config.pbtxt"), (cpu, f"configs/{CPU_CONFIG_NAME}.pbtxt")):
        if config.name and config.name != folder.name:
            problems.append(f"{path} names the model {config.name!r}, the folder is {folder.name!r}")
    if list(production.input) != list(cpu.input) or list(production.output) != list(cpu.output):
        problems.append("config.pbtxt and configs/cpu.pbtxt declare different tensors")
    found = versions(folder)
    if not found:
        problems.append("no version folder (1/, 2/, …)")
    for version in found:
        where = folder / str(version)
        for name in ("model.onnx", "model.py"):
            if not (where / name).is_file():
                problems.append(f"{version}/{name} is missing")
        if not (where / "model.onnx").is_file():
            continue
        try:
            session = ort.InferenceSession(str(where / "model.onnx"), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            problems.append(f"{version}/model.onnx does not load: {exc}")
            continue
        batched = production.max_batch_size > 0
        problems += [f"{version}: {p}" for p in _check_tensors("input", production.input, session.get_inputs(), batched, f"{version}/model.onnx")]
        problems += [f"{version}: {p}" for p in _check_tensors("output", production.output, session.get_outputs(), batched, f"{version}/model.onnx")]
    if problems:
        raise ModelFolderError(f"model {folder.name}: " + "; ".join(problems))
    return found


def validate_repository(repository: Path) -> dict[str, list[int]]:
    """Every model folder of the repository, each validated; the first broken one raises."""
    if not repository.is_dir():
        raise ModelFolderError(f"model repository {repository} does not exist")
    return {
        folder.name: validate_model_folder(folder)
        for folder in sorted(repository.iterdir())
        if folder.is_dir() and not folder.name.startswith(".")
    }
