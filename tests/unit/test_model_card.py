"""The model card's content and renderings (no registry: export/registry.py logging is tested on the real stack)."""

import json
from pathlib import Path

import numpy as np
import pytest

from vitrine.export import model_card, onnx_export
from vitrine.export.data import sequences, synthetic
from vitrine.export.train import VALIDATION_SAMPLE, TrainConfig, train


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    table = synthetic.generate(synthetic.preset("tiny"))
    out = tmp_path_factory.mktemp("card")
    info = {"fingerprint": table.fingerprint(), "source": "archive:/data/archive", "events": len(table),
            "users": 40, "items": 75, "since": "2026-11-20", "until": "2026-12-01"}
    run = train(TrainConfig(architecture="sasrec", epochs=1, max_len=8, dim=16, threads=1), sequences.build(table, max_len=8), info,
                out / "runs", progress=False)
    result = onnx_export.export_run(run, out / "repo", name="shop_ranker", max_k=10)
    return run, result.folder


def _evaluation(record: dict) -> dict:
    """The pipeline's evaluate step as it records it: candidate and champion summaries on the same rows."""
    slices = {name: {"recall@10": 0.5, "rows": 10} for name in record["slice_metrics"]["model"]}
    overall = {"recall@10": 0.40, "recall@20": 0.5, "ndcg@10": 0.2, "mrr": 0.1}
    return {"candidate": {"overall": {**overall, "recall@10": 0.44}, "slices": slices},
            "champion": {"overall": overall, "slices": slices}, "k": 50, "champion_version": 2}


def test_the_card_has_every_section_with_data_champion_baselines_slices_and_explained_examples(exported) -> None:
    run, folder = exported
    record = json.loads((run / "run.json").read_text())
    gate = {"accepted": True, "reasons": ["recall@10 +0.04 over the champion (needs +0.01)"]}
    card = model_card.build_from_folders(run, folder, {"name": "shop_ranker", "version": "4", "triton_version": 1,
                                                       "run_id": "r" * 32, "alias": "challenger"}, _evaluation(record), gate)
    text = model_card.render_markdown(card)
    assert [line for line in text.splitlines() if line in model_card.SECTIONS] == list(model_card.SECTIONS)
    assert text.startswith("# Model card: shop_ranker v4")
    assert record["data"]["fingerprint"] in text and "12: date=2026-11-20" in text  # the window's 12 date partitions
    assert "| recall@10 | 0.4400 | 0.4000 | +0.0400 (+10%) |" in text  # against champion v2
    for baseline in ("popularity", "transitions", "cooccurrence"):
        assert f"| {baseline} |" in text
    for slice_name in record["slice_metrics"]["model"]:
        assert f"| {slice_name} |" in text
    assert "The release gate accepted it." in text and "- recall@10 +0.04 over the champion" in text
    assert len(card["examples"]) == model_card.EXAMPLES
    for example in card["examples"]:
        seen = {h["item"] for h in example["history"]}
        assert example["recommended"] and all(r["because_of"] in seen for r in example["recommended"])
    files = model_card.card_files(card)
    assert set(files) == set(model_card.CARD_FILES) and json.loads(files[model_card.CARD_JSON])["model"] == "shop_ranker"


def test_a_version_without_explanations_or_champion_still_gets_a_card(exported, tmp_path: Path) -> None:
    run, folder = exported
    record = json.loads((run / "run.json").read_text())
    card = model_card.build_card(record, {"name": "shop_ranker", "version": "1", "triton_version": 1}, evaluation={"champion": None})
    text = model_card.render_markdown(card)
    assert "this is the model's first version" in text and "No examples" in text
    assert [line for line in text.splitlines() if line in model_card.SECTIONS] == list(model_card.SECTIONS)


def test_html_escapes_what_it_shows() -> None:
    record = {"model": "gru4rec", "metrics": {"model": {"recall@10": 0.1}}, "data": {"source": "<script>alert(1)</script>"}}
    page = model_card.render_html(model_card.build_card(record, {"name": "gru4rec", "version": "1"}))
    assert "<script>" not in page and "&lt;script&gt;" in page and page.count("<h2>") == len(model_card.SECTIONS)


def test_examples_report_no_explanation_for_a_graph_without_explain_steps(exported, tmp_path: Path) -> None:
    run, folder = exported
    import onnx

    graph = onnx.load(str(folder / "model.onnx"))
    kept = [o for o in graph.graph.output if o.name != "explain_steps"]
    del graph.graph.output[:]
    graph.graph.output.extend(kept)
    onnx.save(graph, str(tmp_path / "old.onnx"))
    sample = np.load(run / VALIDATION_SAMPLE)
    vocabulary = tuple(json.loads((run / "vocabulary.json").read_text()))
    examples = model_card.examples(tmp_path / "old.onnx", vocabulary, sample["items"], sample["types"])
    assert examples and all(r["because_of"] is None for e in examples for r in e["recommended"])
