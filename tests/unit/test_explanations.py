"""Explanations computed in the exported graph (`explain_steps`): for each recommended item, the history step
whose item is closest to it. Hand-built embeddings decide what the right step is; parity between torch and
onnxruntime covers it as it covers the top-k; the gateway turns steps into the shopper's history items."""

import io
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from vitrine.contracts import ranker
from vitrine.export import onnx_export
from vitrine.export.data import sequences, synthetic
from vitrine.export.data.sequences import FIRST_ITEM, OOV, PAD
from vitrine.export.models import GRU4Rec, NO_STEP, ServingRanker, build, explain_steps
from vitrine.export.train import TrainConfig, train
from vitrine.services.gateway.ranking import ServedModel

# Hand-built item vectors (rows = model item ids; 0 padding, 1 unknown). Cosine decides, not the dot product:
# item 5 is long and points along x; item 3 is short and points along y.
TABLE = torch.tensor([
    [0.0, 0.0],    # 0 padding
    [0.0, 1.0],    # 1 unknown: identical to the recommended item 6, yet never an explanation
    [1.0, 0.0],    # 2
    [0.0, 0.5],    # 3
    [-1.0, 0.0],   # 4
    [10.0, 1.0],   # 5
    [0.2, 1.0],    # 6: dot prefers 5 (3.0 vs 0.5), cosine prefers 3 (0.98 vs 0.29)
    [1.0, -0.3],   # 7: closest to 2 by angle (cosine 0.96 vs 0.92 for 5)
])


def test_each_recommended_item_is_explained_by_its_closest_known_history_step() -> None:
    history = torch.tensor([[PAD, PAD, 2, OOV, 3, 5]])  # positions 0..5; 1 is unknown and must be skipped
    top = torch.tensor([[6, 7, 4, 3]])
    steps = explain_steps(TABLE, history, top)
    # 6 → item 3 at position 4 (cosine, not dot: the dot product would name item 5 at position 5);
    # 7 → item 2 at position 2; 4 (pointing away from x) → item 3 at position 4 (cosine 0 beats -1 and -0.995);
    # 3 → itself at position 4.
    assert steps.tolist() == [[4, 2, 4, 4]]
    assert steps.dtype == torch.int64


def test_empty_or_unknown_only_histories_have_no_step() -> None:
    history = torch.tensor([[PAD, PAD, PAD, PAD], [PAD, PAD, OOV, OOV], [PAD, PAD, OOV, 7]])
    top = torch.tensor([[2, 6], [2, 6], [2, 6]])
    assert explain_steps(TABLE, history, top).tolist() == [[NO_STEP, NO_STEP], [NO_STEP, NO_STEP], [3, 3]]


def _closest_positions(table: np.ndarray, history: np.ndarray, item: int) -> set[int]:
    """Every known position whose cosine with `item` is the row's best (a tie gives several)."""
    unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
    known = [p for p, h in enumerate(history) if h >= FIRST_ITEM]
    similarity = {p: float(unit[item] @ unit[history[p]]) for p in known}
    best = max(similarity.values())
    return {p for p, s in similarity.items() if s >= best - 1e-6}


@pytest.mark.parametrize("architecture", ["gru4rec", "sasrec"])
def test_the_serving_graph_explains_every_slot_with_a_real_history_position(architecture: str) -> None:
    torch.manual_seed(1)
    model = build(architecture, n_items=40, max_len=6, dim=8, tied=architecture == "gru4rec").eval()
    serving = ServingRanker(model, k=10)
    feed = onnx_export.random_inputs(np.random.default_rng(3), 32, 6, model.n_items)
    with torch.no_grad():
        ids, _, steps = (t.numpy() for t in serving(*(torch.from_numpy(feed[n]) for n in ranker.INPUTS)))
    table = model.output_table.detach().numpy()
    assert steps.shape == ids.shape
    for row in range(len(ids)):
        history = feed[ranker.ITEM_IDS][row]
        if not (history >= FIRST_ITEM).any():
            assert (steps[row] == NO_STEP).all()
            continue
        for item, step in zip(ids[row], steps[row], strict=True):
            assert 0 <= step < len(history) and history[step] >= FIRST_ITEM  # a real, known step of this history
            assert step in _closest_positions(table, history, int(item))


def test_onnx_explanations_match_torch_and_a_planted_wrong_step_fails_parity() -> None:
    torch.manual_seed(0)
    serving = ServingRanker(GRU4Rec(n_items=30, dim=8).eval(), k=10)
    onnx_bytes = onnx_export.to_onnx(serving, 5)
    assert onnx_export.check_parity(serving, onnx_bytes, 5) <= onnx_export.SCORE_TOLERANCE
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(ranker.EXPLAINED_OUTPUTS)

    class FarthestStep(torch.nn.Module):  # the planted bug: the least similar step instead of the closest
        def __init__(self) -> None:
            super().__init__()
            self.serving = serving

        def forward(self, items: torch.Tensor, types: torch.Tensor, exclude: torch.Tensor):  # noqa: ANN202
            ids, scores, steps = self.serving(items, types, exclude)
            from vitrine.export.models import step_similarities
            similarity = step_similarities(self.serving.model.output_table, items, ids)
            wrong = similarity.masked_fill(similarity < -1.5, 2.0).argmin(dim=2)
            return ids, scores, torch.where(steps < 0, steps, wrong)

    with pytest.raises(onnx_export.ParityError, match="explanation steps differ without a tie"):
        onnx_export.check_parity(serving, onnx_export.to_onnx(FarthestStep(), 5), 5)


class _WithoutExplanations(torch.nn.Module):
    """A graph as exported before explain_steps existed (the committed v1 models)."""

    def __init__(self, serving: ServingRanker) -> None:
        super().__init__()
        self.serving = serving

    def forward(self, *inputs: torch.Tensor):  # noqa: ANN202
        ids, scores, _ = self.serving(*inputs)
        return ids, scores


def _outputs(config_file: Path) -> list[str]:
    return [t.name for t in text_format.Parse(config_file.read_text(), mc.ModelConfig()).output]


def test_the_config_declares_explain_steps_only_once_every_kept_version_has_it(tmp_path: Path) -> None:
    table = synthetic.generate(synthetic.preset("tiny"))
    run = train(TrainConfig(architecture="gru4rec", epochs=1, max_len=8, dim=16), sequences.build(table, max_len=8),
                {"fingerprint": table.fingerprint()}, tmp_path / "runs", progress=False)
    repository = tmp_path / "repo"
    first = onnx_export.export_run(run, repository, max_k=10, keep_versions=2)
    folder = repository / first.model
    assert onnx_export.has_explanations(first.folder / "model.onnx")
    for config in (folder / "config.pbtxt", folder / "configs" / "cpu.pbtxt"):
        assert _outputs(config) == list(ranker.EXPLAINED_OUTPUTS)
    # Make version 1 an old-style graph without the output, as the committed v1 models are.
    old = ServingRanker(GRU4Rec(n_items=20, dim=4).eval(), k=10)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_WithoutExplanations(old), (torch.zeros((2, 8), dtype=torch.long),) * 2 + (torch.zeros((2, 1), dtype=torch.long),),
                          buffer, dynamo=False, input_names=list(ranker.INPUTS), output_names=list(ranker.OUTPUTS),
                          dynamic_axes={ranker.ITEM_IDS: {0: "b"}, ranker.EVENT_TYPES: {0: "b"}, ranker.EXCLUDE_IDS: {0: "b", 1: "e"},
                                        ranker.TOP_IDS: {0: "b"}, ranker.TOP_SCORES: {0: "b"}})
    (first.folder / "model.onnx").write_bytes(buffer.getvalue())
    assert not onnx_export.has_explanations(first.folder / "model.onnx")
    second = onnx_export.export_run(run, repository, max_k=10, keep_versions=2)  # keeps 1 and 2: 1 lacks it
    assert second.version == 2
    for config in (folder / "config.pbtxt", folder / "configs" / "cpu.pbtxt"):
        assert _outputs(config) == list(ranker.OUTPUTS)
    third = onnx_export.export_run(run, repository, max_k=10, keep_versions=2)  # keeps 2 and 3: both have it
    assert third.removed_versions == [1]
    assert _outputs(folder / "config.pbtxt") == list(ranker.EXPLAINED_OUTPUTS)


def test_the_gateway_maps_steps_to_the_shoppers_history_items() -> None:
    items = ("a", "b", "c", "d", "e")
    model = ServedModel("m", "1", 4, 3, items, FIRST_ITEM, {x: n + FIRST_ITEM for n, x in enumerate(items)}, explains=True)
    history = np.array([PAD, 3, OOV, 5])  # b, unknown, d
    ids = np.array([6, 2, 4, 0])
    steps = np.array([3, 1, 2, NO_STEP])  # e ← d; a ← b; c ← the unknown step (never valid); padding slot
    assert model.explanations(history, ids, steps) == {"e": "d", "a": "b"}
    assert model.explanations(history, ids, np.array([0, 9, NO_STEP, NO_STEP])) == {}  # padding or out of range: none


# --- the gateway's explain flag, on its real request path in front of a stand-in Triton ---------------
from dataclasses import replace  # noqa: E402

from tests.unit.test_gateway_failures import Context, Triton, _Result, gateway  # noqa: E402
from vitrine.v1 import recommender_pb2 as pb  # noqa: E402


class _Explained(_Result):
    def as_numpy(self, name: str) -> np.ndarray:
        if name == ranker.EXPLAIN_STEPS:  # history [pad, pad, pad, i1, i2]: 4 → i2, 3 → i1
            return np.tile(np.array([4, 3, 4, 3], dtype=np.int64), (self.batch, 1))
        return super().as_numpy(name)


class ExplainingTriton(Triton):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[list[str]] = []

    async def infer(self, model_name, inputs, model_version, outputs, client_timeout):  # noqa: ANN001, ANN201
        self.asked.append([o.name() for o in outputs])
        result = await super().infer(model_name, inputs, model_version, outputs, client_timeout)
        return _Explained(result.batch)


def _service(explains: bool, triton: Triton):  # noqa: ANN202
    service, _, _ = gateway(triton)
    service.catalog.model = replace(service.catalog.model, explains=explains)
    return service



@pytest.mark.timeout(20)
async def test_explain_true_names_the_history_item_of_each_recommended_item() -> None:
    triton = ExplainingTriton()
    reply = await _service(True, triton).Recommend(pb.RecommendRequest(user_id="u1", k=3, explain=True), Context(5.0))
    assert reply.model_name == "gru4rec" and not reply.degraded
    assert [(i.item_id, i.explained_by) for i in reply.items] == [("i0", "i2"), ("i1", "i1"), ("i2", "i2")]
    assert reply.explanation_unavailable == "" and triton.asked == [list(ranker.EXPLAINED_OUTPUTS)]


@pytest.mark.timeout(20)
async def test_explain_false_asks_triton_for_nothing_more_and_answers_as_before() -> None:
    triton = ExplainingTriton()
    reply = await _service(True, triton).Recommend(pb.RecommendRequest(user_id="u1", k=3), Context(5.0))
    assert [i.item_id for i in reply.items] == ["i0", "i1", "i2"] and not any(i.explained_by for i in reply.items)
    assert reply.explanation_unavailable == "" and triton.asked == [list(ranker.OUTPUTS)]


@pytest.mark.timeout(20)
async def test_a_model_without_explanations_still_serves_and_says_so() -> None:
    triton = ExplainingTriton()
    reply = await _service(False, triton).Recommend(pb.RecommendRequest(user_id="u1", k=3, explain=True), Context(5.0))
    assert [i.item_id for i in reply.items] == ["i0", "i1", "i2"] and not reply.degraded
    assert reply.explanation_unavailable == "model_without_explanations" and not any(i.explained_by for i in reply.items)
    assert triton.asked == [list(ranker.OUTPUTS)]  # never asks a version for an output it does not have


@pytest.mark.timeout(20)
async def test_a_degraded_answer_has_no_explanations_and_says_why() -> None:
    triton = ExplainingTriton()
    triton.down = True
    reply = await _service(True, triton).Recommend(pb.RecommendRequest(user_id="u1", k=3, explain=True), Context(5.0))
    assert reply.degraded and reply.explanation_unavailable == "degraded"
    assert not any(i.explained_by for i in reply.items)


@pytest.mark.timeout(20)
async def test_interleaved_answers_carry_the_placing_models_explanations() -> None:
    from vitrine.services.gateway.experiment import Experiment, Variant

    triton = ExplainingTriton()
    service = _service(True, triton)

    class Interleaved:
        current = Experiment(salt="s", mode="interleave", variants=(Variant(name="a", model_name="gru4rec", weight=50),
                                                                    Variant(name="b", model_name="gru4rec", weight=50)))

    service.experiment = Interleaved()
    reply = await service.Recommend(pb.RecommendRequest(user_id="u1", k=3, explain=True), Context(5.0))
    assert reply.model_name == "interleaved" and {i.variant for i in reply.items} <= {"a", "b"}
    assert [(i.item_id, i.explained_by) for i in reply.items] == [("i0", "i2"), ("i1", "i1"), ("i2", "i2")]
