import filecmp
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from vitrine.export import smoke
from vitrine.export.triton_repository import (
    PYTHON_MODEL_SOURCE,
    ModelSpec,
    TensorSpec,
    add_version,
    cpu_config,
    production_config,
    render,
    versions,
    write_model_folder,
)
from vitrine.settings import REPO_ROOT

SPEC = ModelSpec(
    name="m",
    inputs=(TensorSpec("items", np.dtype(np.int64), (-1,)),),
    outputs=(TensorSpec("scores", np.dtype(np.float32), (10,)),),
    tensorrt_fp16=True,
)


def test_both_configs_describe_the_same_tensors_and_differ_only_in_how_they_run() -> None:
    gpu, cpu = production_config(SPEC), cpu_config(SPEC)
    assert gpu.platform == "onnxruntime_onnx" and not gpu.backend
    assert gpu.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert gpu.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    assert cpu.backend == "python" and not cpu.platform
    assert cpu.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert list(gpu.input) == list(cpu.input) and list(gpu.output) == list(cpu.output)
    assert gpu.dynamic_batching == cpu.dynamic_batching
    assert list(gpu.dynamic_batching.preferred_batch_size) == [8, 32, 64]
    # Rendered text parses back into the same message: Triton reads what we wrote.
    assert text_format.Parse(render(gpu), mc.ModelConfig()) == gpu


def test_versions_count_up_and_are_never_overwritten(tmp_path: Path) -> None:
    folder = write_model_folder(tmp_path, SPEC)
    assert (folder / "config.pbtxt").exists() and (folder / "configs" / "cpu.pbtxt").exists()
    first, second = add_version(folder, b"one"), add_version(folder, b"two")
    assert (first.name, second.name) == ("1", "2") and versions(folder) == [1, 2]
    assert (second / "model.onnx").read_bytes() == b"two"
    assert filecmp.cmp(second / "model.py", PYTHON_MODEL_SOURCE, shallow=False)
    with pytest.raises(FileExistsError, match="immutable"):
        add_version(folder, b"again", version=1)
    assert (first / "model.onnx").read_bytes() == b"one"
    assert not list(folder.glob(".staging-*"))


def test_the_committed_smoke_model_is_what_the_code_builds(tmp_path: Path) -> None:
    committed = REPO_ROOT / "model_repository" / smoke.NAME
    built = smoke.write(tmp_path)
    assert (committed / "1" / "model.onnx").read_bytes() == (built / "model.onnx").read_bytes()
    for name in ("config.pbtxt", "configs/cpu.pbtxt", "1/model.py"):
        assert (committed / name).read_text() == (tmp_path / smoke.NAME / name).read_text(), name


def test_smoke_model_has_a_dynamic_batch_axis() -> None:
    session = ort.InferenceSession(smoke.build_onnx(), providers=["CPUExecutionProvider"])
    for rows in (1, 5):
        (scores,) = session.run(None, {smoke.INPUT: np.ones((rows, smoke.FEATURES), np.float32)})
        assert scores.shape == (rows, smoke.OUTPUTS) and np.all(np.abs(scores) <= 1)


def test_every_served_model_py_is_the_exported_runner() -> None:
    copies = list((REPO_ROOT / "model_repository").glob("*/[0-9]*/model.py"))
    assert len(copies) >= 3
    for copy in copies:
        assert filecmp.cmp(copy, PYTHON_MODEL_SOURCE, shallow=False), copy
