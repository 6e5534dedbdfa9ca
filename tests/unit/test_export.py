"""ONNX export, parity, versions and model-folder validation (onnxruntime in-process, no Triton)."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from vitrine.contracts import ranker
from vitrine.export import onnx_export
from vitrine.export.data import sequences, synthetic
from vitrine.export.models import ServingRanker
from vitrine.export.train import TrainConfig, load_run, train
from vitrine.export.validate import ModelFolderError, validate_model_folder, validate_repository
from vitrine.services.stack.components import triton
from vitrine.settings import Settings


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory) -> dict[str, Path]:
    table = synthetic.generate(synthetic.preset("tiny"))
    dataset = sequences.build(table, max_len=8)
    out = tmp_path_factory.mktemp("runs")
    return {
        arch: train(TrainConfig(architecture=arch, epochs=1, max_len=8, dim=16), dataset,
                    {"fingerprint": table.fingerprint()}, out, progress=False)
        for arch in ("gru4rec", "sasrec")
    }


@pytest.mark.parametrize("architecture", ["gru4rec", "sasrec"])
def test_export_passes_parity_and_onnxruntime_matches_torch_on_fresh_inputs(run_dirs, architecture: str, tmp_path: Path) -> None:
    result = onnx_export.export_run(run_dirs[architecture], tmp_path, max_k=10)
    assert result.version == 1 and result.max_abs_score_diff <= onnx_export.SCORE_TOLERANCE
    session = ort.InferenceSession(str(result.folder / "model.onnx"), providers=["CPUExecutionProvider"])
    model, _, _ = load_run(run_dirs[architecture])
    serving = ServingRanker(model, k=10)
    for batch in (1, 5, 33):  # other batch sizes than the export's own parity check
        feed = onnx_export.random_inputs(np.random.default_rng(batch + 100), batch, 8, model.n_items)
        ids, scores = session.run(list(ranker.OUTPUTS), feed)
        with torch.no_grad():
            ids_t, scores_t = serving(*(torch.from_numpy(feed[n]) for n in ranker.INPUTS))
        np.testing.assert_allclose(scores, scores_t.numpy(), atol=1e-4, rtol=0)
        assert ids.shape == (batch, 10)
        excluded = feed[ranker.EXCLUDE_IDS]
        for row in range(batch):
            kept = scores[row] > ranker.EXCLUDED_SCORE
            assert not set(ids[row][kept].tolist()) & set(excluded[row].tolist())


def test_exported_version_carries_metadata_for_serving_and_drift(run_dirs, tmp_path: Path) -> None:
    result = onnx_export.export_run(run_dirs["gru4rec"], tmp_path, max_k=10)
    metadata = json.loads((result.folder / ranker.METADATA_FILE).read_text())
    assert metadata["run"]["model"] == "gru4rec" and metadata["serving"]["max_len"] == 8
    assert len(metadata["vocabulary"]) + 2 == load_run(run_dirs["gru4rec"])[0].n_items
    reference = metadata["reference"]
    assert set(reference) >= {"sequence_length", "popularity_mix", "unknown_item_rate", "empty_history_rate", "top1_score"}
    assert sum(reference["sequence_length"]["counts"]) == sum(reference["top1_score"]["counts"]) > 0
    assert sum(reference["popularity_mix"]["shares"]) == pytest.approx(1.0)


def test_new_exports_get_the_next_version_and_old_ones_are_pruned(run_dirs, tmp_path: Path) -> None:
    numbers = [onnx_export.export_run(run_dirs["sasrec"], tmp_path, max_k=5, keep_versions=2).version for _ in range(3)]
    assert numbers == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "sasrec").iterdir() if p.name.isdigit()) == ["2", "3"]
    assert validate_model_folder(tmp_path / "sasrec") == [2, 3]


def test_a_run_with_other_shapes_cannot_become_a_version_of_the_same_model(run_dirs, tmp_path: Path) -> None:
    onnx_export.export_run(run_dirs["gru4rec"], tmp_path, max_k=10)
    config_before = (tmp_path / "gru4rec" / "config.pbtxt").read_text()
    with pytest.raises(ModelFolderError, match="another name"):
        onnx_export.export_run(run_dirs["gru4rec"], tmp_path, max_k=12)
    assert (tmp_path / "gru4rec" / "config.pbtxt").read_text() == config_before
    assert onnx_export.export_run(run_dirs["gru4rec"], tmp_path, name="gru4rec_k12", max_k=12).version == 1


def test_a_broken_graph_fails_the_parity_check(run_dirs) -> None:
    model, record, _ = load_run(run_dirs["gru4rec"])
    serving = ServingRanker(model, k=10)
    onnx_bytes = onnx_export.to_onnx(serving, 8)
    with torch.no_grad():
        model.embed.items.weight[2:] += 0.5  # torch now disagrees with the exported graph
    with pytest.raises(onnx_export.ParityError, match="differ"):
        onnx_export.check_parity(serving, onnx_bytes, 8)


@pytest.fixture
def exported(run_dirs, tmp_path: Path) -> Path:
    onnx_export.export_run(run_dirs["gru4rec"], tmp_path / "repo", max_k=10)
    return tmp_path / "repo" / "gru4rec"


def test_a_missing_file_is_named(exported: Path) -> None:
    (exported / "1" / "model.py").unlink()
    with pytest.raises(ModelFolderError, match=r"model gru4rec: 1/model.py is missing"):
        validate_model_folder(exported)


def test_config_shapes_that_do_not_match_the_onnx_are_named(exported: Path) -> None:
    for config in (exported / "config.pbtxt", exported / "configs" / "cpu.pbtxt"):
        config.write_text(config.read_text().replace("dims: 8", "dims: 9", 1))
    with pytest.raises(ModelFolderError, match=r"input 'item_ids': config dims \[9\], ONNX shape \['batch', 8\]"):
        validate_model_folder(exported)


def test_configs_that_disagree_with_each_other_are_named(exported: Path) -> None:
    cpu = exported / "configs" / "cpu.pbtxt"
    cpu.write_text(cpu.read_text().replace('name: "top_scores"', 'name: "scores"'))
    with pytest.raises(ModelFolderError, match="declare different tensors"):
        validate_model_folder(exported)


def test_stack_refuses_to_start_triton_on_a_broken_repository(exported: Path, tmp_path: Path) -> None:
    (exported / "1" / "model.onnx").write_bytes(b"not onnx")
    base = Settings()
    settings = base.model_copy(update={
        "triton": base.triton.model_copy(update={"model_repository": exported.parent}),
        "stack": base.stack.model_copy(update={"home": tmp_path / "stack"}),
    })
    with pytest.raises(ModelFolderError, match="1/model.onnx does not load"):
        triton(settings).prepare()


def test_the_repository_in_git_is_valid() -> None:
    found = validate_repository(Settings().triton.model_repository)
    assert {"smoke", "gru4rec", "sasrec"} <= set(found)
