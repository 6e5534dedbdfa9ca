"""ONNX export, parity, versions and model-folder validation (onnxruntime in-process, no Triton)."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from vitrine.contracts import ranker
from vitrine.export import onnx_export, serving_check
from vitrine.export.data import sequences, synthetic
from vitrine.export.models import ServingRanker
from vitrine.export.topk import unexplained_id_differences
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
            ids_t, scores_t, _ = serving(*(torch.from_numpy(feed[n]) for n in ranker.INPUTS))
        np.testing.assert_allclose(scores, scores_t.numpy(), atol=1e-4, rtol=0)
        assert ids.shape == (batch, 10)
        # The same items as torch's top-k, slot by slot, except where torch's scores of the two items tie.
        wrong = unexplained_id_differences(ids_t.numpy(), scores_t.numpy(), ids, onnx_export.SCORE_TOLERANCE)
        assert not wrong.any(), f"batch {batch}: onnxruntime ids {ids[wrong]} where torch has {ids_t.numpy()[wrong]}"
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


def test_a_protected_version_survives_pruning_and_stays_served(run_dirs, tmp_path: Path) -> None:
    """The registry's champion/fallback or a pinned variant (here version 1) is never pruned, however old, and the
    config's version policy serves it beside the newest ones (with `latest: 2` Triton would not load it)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    exported = [onnx_export.export_run(run_dirs["sasrec"], tmp_path, max_k=5, keep_versions=2, protected=frozenset({1}))
                for _ in range(4)]
    assert [e.version for e in exported] == [1, 2, 3, 4] and [e.removed_versions for e in exported] == [[], [], [], [2]]
    assert validate_model_folder(tmp_path / "sasrec") == [1, 3, 4]
    for path in (tmp_path / "sasrec" / "config.pbtxt", tmp_path / "sasrec" / "configs" / "cpu.pbtxt"):
        config = text_format.Parse(path.read_text(), mc.ModelConfig())
        assert list(config.version_policy.specific.versions) == [1, 3, 4], path
        assert {k for k in config.parameters if k.startswith("vitrine.metadata.")} == set()  # no registry here


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


TOLERANCE = 1e-4


def test_top_k_ids_may_differ_only_where_the_reference_scores_tie() -> None:
    ids = np.array([[10, 11, 12, 13, 14]])
    scores = np.array([[9.0, 7.0, 5.0, 5.0, 3.0]])
    assert not unexplained_id_differences(ids, scores, ids, TOLERANCE).any()
    assert not unexplained_id_differences(ids, scores, ids[:, [0, 1, 3, 2, 4]], TOLERANCE).any()  # 12 and 13 tie at 5.0
    # An item outside the reference top-k scored at most 3.0 (the k-th): it can tie with the last slot only.
    assert not unexplained_id_differences(ids, scores, np.array([[10, 11, 12, 13, 99]]), TOLERANCE).any()
    assert unexplained_id_differences(ids, scores, np.array([[10, 11, 99, 13, 14]]), TOLERANCE).tolist() == [[False, False, True, False, False]]
    # A top-k never names an item twice.
    assert unexplained_id_differences(ids, scores, np.array([[10, 11, 12, 13, 13]]), TOLERANCE).tolist() == [[False] * 4 + [True]]
    # With the reference's score of every item, an item outside the top-k may replace any slot it ties with.
    full = np.full((1, 100), -1.0)
    full[0, ids[0]] = scores[0]
    full[0, 99] = 7.0
    assert not unexplained_id_differences(ids, scores, np.array([[10, 99, 12, 13, 14]]), TOLERANCE, full_scores=full).any()
    assert unexplained_id_differences(ids, scores, np.array([[99, 11, 12, 13, 14]]), TOLERANCE, full_scores=full)[0, 0]


def test_a_server_that_returns_the_right_scores_with_permuted_ids_is_caught() -> None:
    """The planted bug the old check (ids differ & ~isclose(served scores, local scores)) let through."""
    local_ids = np.array([[10, 11, 12, 13], [20, 21, 22, 23]])
    local_scores = np.array([[4.0, 3.0, 2.0, 1.0], [8.0, 6.0, 6.0, 5.0]])
    served_ids, served_scores = np.roll(local_ids, 1, axis=1), local_scores.copy()
    old_check_failed = np.any((served_ids != local_ids) & ~np.isclose(served_scores, local_scores, atol=TOLERANCE))
    assert not old_check_failed
    # Every moved id is caught, except 21 in 22's slot: both score 6.0, a tie.
    assert unexplained_id_differences(local_ids, local_scores, served_ids, TOLERANCE).tolist() == [[True] * 4, [True, True, False, True]]


class _RolledIds(torch.nn.Module):
    """A planted bug in the exported graph: every slot keeps its score, the ids move one slot to the right."""

    def __init__(self, serving: ServingRanker) -> None:
        super().__init__()
        self.serving = serving

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, scores, steps = self.serving(*inputs)
        return ids.roll(1, dims=1), scores, steps


def test_a_graph_with_the_right_scores_and_wrong_ids_fails_the_parity_check(run_dirs) -> None:
    model, _, _ = load_run(run_dirs["sasrec"])
    serving = ServingRanker(model, k=10)
    with pytest.raises(onnx_export.ParityError, match="ids differ without a tie"):
        onnx_export.check_parity(serving, onnx_export.to_onnx(_RolledIds(serving), 8), 8)


class _ReadyTriton:
    """Stands in for the Triton client in `verify_served`; the answers come from the patched `infer_ranker`."""

    async def is_model_ready(self, model: str, version: str) -> bool:
        return True

    async def get_model_config(self, model: str, version: str, as_json: bool) -> dict:
        return {"config": {"output": []}}  # no explain_steps declared: only ids and scores are compared here


async def test_the_serving_check_refuses_wrong_ids_with_the_right_scores(run_dirs, tmp_path: Path, monkeypatch) -> None:
    result = onnx_export.export_run(run_dirs["gru4rec"], tmp_path, max_k=10)
    session = ort.InferenceSession(str(result.folder / "model.onnx"), providers=["CPUExecutionProvider"])
    planted = {"roll": 0}

    async def served(client, model: str, version: int | None, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        ids, scores = session.run(list(ranker.OUTPUTS), feed)
        return np.roll(ids, planted["roll"], axis=1), scores

    monkeypatch.setattr(serving_check, "infer_ranker", served)
    await serving_check.verify_served(_ReadyTriton(), "gru4rec", result.folder)  # honest server: passes
    planted["roll"] = 1
    with pytest.raises(serving_check.ServingMismatch, match="ids differ from onnxruntime in-process without a tie"):
        await serving_check.verify_served(_ReadyTriton(), "gru4rec", result.folder)


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
