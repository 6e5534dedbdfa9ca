"""The `smoke` model: a tiny ONNX graph that proves the serving path end to end.

`vitrine stack up` only calls Triton healthy when every model in the repository is READY, so this
model exercises the python backend, its stub, numpy and onnxruntime on every start, before any
trained model exists. Its weights come from a fixed seed: rebuilding gives the same bytes, which
tests/unit/test_smoke_model.py checks against the copy committed in model_repository/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vitrine.export.triton_repository import ModelSpec, TensorSpec, add_version, write_model_folder

NAME = "smoke"
FEATURES = 8
OUTPUTS = 4
SEED = 20261124
INPUT = "INPUT"
OUTPUT = "SCORES"

SPEC = ModelSpec(
    name=NAME,
    inputs=(TensorSpec(INPUT, np.dtype(np.float32), (FEATURES,)),),
    outputs=(TensorSpec(OUTPUT, np.dtype(np.float32), (OUTPUTS,)),),
    max_batch_size=128,
    keep_versions=1,
)


def build_onnx() -> bytes:
    """SCORES = tanh(INPUT @ W + b), with a dynamic batch axis."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(SEED)
    weights = rng.standard_normal((FEATURES, OUTPUTS)).astype(np.float32)
    bias = rng.standard_normal(OUTPUTS).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [INPUT, "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
            helper.make_node("Tanh", ["logits"], [OUTPUT]),
        ],
        NAME,
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", OUTPUTS])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="vitrine")
    model.ir_version = 9  # readable by the onnxruntime in Triton 2.51's production container as well
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write(repository: Path) -> Path:
    """(Re)write model_repository/smoke with version 1."""
    folder = write_model_folder(repository, SPEC)
    version = folder / "1"
    if version.exists():
        for name in ("model.onnx", "model.py"):
            (version / name).unlink(missing_ok=True)
        version.rmdir()
    return add_version(folder, build_onnx(), version=1)
