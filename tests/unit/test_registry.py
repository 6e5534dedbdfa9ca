"""The registry's naming rules and the CLI's registry flags, without a registry (export/registry.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vitrine.cli import app
from vitrine.export import registry
from vitrine.export.onnx_export import _metadata_parameters
from vitrine.export.triton_repository import ModelSpec, TensorSpec, config_parameters, write_model_folder

runner = CliRunner()
RUN_ID = "0123456789abcdef0123456789abcdef"

RECORD = {
    "model": "gru4rec",
    "parameters": {"architecture": "gru4rec", "epochs": 1, "dim": 16, "dropout": None, "loss": "full"},
    "data": {"source": "synthetic:tiny", "seed": 7, "fingerprint": "f" * 64, "events": 1200, "drift_at_day": None},
    "metrics": {
        "model": {"recall@10": 0.5, "recall@20": 0.6, "ndcg@10": 0.3, "mrr": 0.25},
        "popularity": {"recall@10": 0.1, "recall@20": 0.2, "ndcg@10": 0.05, "mrr": 0.04},
        "transitions": {"recall@10": 0.45, "recall@20": 0.5, "ndcg@10": 0.28, "mrr": 0.2},
    },
    "baselines": {"strongest": "transitions", "metric": "recall@10", "config": {"window": 5, "decay": 0.8},
                  "metrics": {}, "duration_s": 1.5},
    "slice_metrics": {
        "model": {"history 2-4": {"recall@10": 0.4, "rows": 30}, "long-tail items": {"recall@10": 0.1, "rows": 12}},
        "transitions": {"history 2-4": {"recall@10": 0.42, "rows": 30}},
    },
    "history": [{"epoch": 1, "loss": 5.0}],
    "code_version": "abc1234-dirty",
    "duration_s": 3.25,
}


@pytest.mark.parametrize(("name", "key"), [
    ("recall@10", "recall_10"), ("history 2-4", "history_2_4"), ("long-tail items", "long_tail_items"),
    ("NDCG@10", "ndcg_10"), ("mrr", "mrr"), ("history ≥10", "history_10"),
])
def test_metric_keys_are_lower_case_segments(name: str, key: str) -> None:
    assert registry.metric_key(name) == key


def test_a_name_without_letters_or_digits_is_refused() -> None:
    with pytest.raises(ValueError, match="no letters or digits"):
        registry.metric_key("@@ ")


def test_metrics_are_flattened_per_ranker_and_slice() -> None:
    flat = registry.flatten_metrics(RECORD)
    assert flat["model.recall_10"] == 0.5
    assert flat["baseline.transitions.recall_10"] == 0.45
    assert flat["baseline.popularity.mrr"] == 0.04
    assert flat["model.slice.history_2_4.recall_10"] == 0.4
    assert flat["baseline.transitions.slice.history_2_4.recall_10"] == 0.42
    assert flat["slice.long_tail_items.rows"] == 12.0
    assert flat["duration_s"] == 3.25 and flat["baselines.duration_s"] == 1.5
    # every number of the record is there, once: 3 rankers × 4 metrics, 3 slice metrics, 2 slice sizes, 2 durations
    assert len(flat) == 12 + 3 + 2 + 2


def test_params_hold_the_training_choices_but_not_the_fingerprint() -> None:
    params = registry.flatten_params(RECORD)
    assert params["epochs"] == "1" and params["dropout"] == "null" and params["loss"] == "full"
    assert params["data.source"] == "synthetic:tiny" and params["data.events"] == "1200"
    assert params["baselines.window"] == "5" and params["baselines.metric"] == "recall@10"
    assert not any("fingerprint" in key for key in params)


def test_a_long_param_value_is_cut_to_mlflows_limit() -> None:
    record = {**RECORD, "parameters": {"note": "x" * 10_000}}
    value = registry.flatten_params(record)["note"]
    assert len(value) == registry.MAX_PARAM_VALUE and value.endswith("...")


def test_tags_carry_lineage_and_the_commit_without_the_dirty_mark() -> None:
    tags = registry.run_tags(RECORD, "gru4rec-20261201T120000-ffffffff", "vitrine train")
    assert tags[registry.TAG_DATA_FINGERPRINT] == "f" * 64
    assert tags[registry.TAG_CODE_VERSION] == "abc1234-dirty" and tags[registry.TAG_GIT_COMMIT] == "abc1234"
    assert tags[registry.TAG_SOURCE] == "vitrine train" and tags[registry.TAG_RUN_FOLDER].startswith("gru4rec-")
    assert tags[registry.TAG_STRONGEST_BASELINE] == "transitions" and tags[registry.TAG_MODEL] == "gru4rec"
    assert registry.TAG_GIT_COMMIT not in registry.run_tags({**RECORD, "code_version": "unknown"}, "r", "vitrine export")


def test_metadata_uris_resolve_to_the_servers_download_endpoint() -> None:
    uri = registry.metadata_uri(RUN_ID, "gru4rec", 3)
    assert uri == f"runs:/{RUN_ID}/triton/gru4rec/3/metadata.json"
    assert registry.parse_runs_uri(uri) == (RUN_ID, "triton/gru4rec/3/metadata.json")
    assert registry.artifact_http_url("http://127.0.0.1:15050/", uri) == (
        f"http://127.0.0.1:15050/get-artifact?path=triton%2Fgru4rec%2F3%2Fmetadata.json&run_uuid={RUN_ID}")
    assert registry.metadata_parameter(3) == "vitrine.metadata.3"


@pytest.mark.parametrize("uri", [
    "s3://bucket/metadata.json", f"runs:/{RUN_ID}/../../etc/passwd", "runs:/not-an-id/metadata.json",
    f"runs:/{RUN_ID}/", f"runs:/{RUN_ID}/a b",
])
def test_a_uri_from_a_config_file_is_checked_before_it_is_fetched(uri: str) -> None:
    with pytest.raises(registry.RegistryError):
        registry.artifact_http_url("http://127.0.0.1:15050", uri)


def test_registry_names_refuse_quotes_that_would_break_a_filter() -> None:
    with pytest.raises(registry.RegistryError):
        registry._quote("gru4rec' OR name LIKE '%")


def _spec(parameters: tuple[tuple[str, str], ...]) -> ModelSpec:
    import numpy as np

    i64 = np.dtype(np.int64)
    return ModelSpec("gru4rec", (TensorSpec("ITEM_IDS", i64, (5,)),), (TensorSpec("TOP_IDS", i64, (4,)),), parameters=parameters)


def test_triton_configs_keep_the_metadata_uris_of_kept_versions_only(tmp_path: Path) -> None:
    folder = write_model_folder(tmp_path, _spec((("vitrine.metadata.1", "runs:/a/1"), ("vitrine.metadata.2", "runs:/a/2"),
                                                 ("other", "kept out"))))
    assert config_parameters(folder)["vitrine.metadata.2"] == "runs:/a/2"
    assert 'key: "vitrine.metadata.1"' in (folder / "configs" / "cpu.pbtxt").read_text()
    merged = _metadata_parameters(folder, kept=[2, 3], new_version=3, uri="runs:/b/3")
    assert merged == (("vitrine.metadata.2", "runs:/a/2"), ("vitrine.metadata.3", "runs:/b/3"))
    assert _metadata_parameters(folder, kept=[2, 3], new_version=3, uri=None) == (("vitrine.metadata.2", "runs:/a/2"),)


# --- CLI validation: bad input exits 2 before any registry call; a missing registry is named (exit 1) ---------

CLOSED = {"VITRINE_REGISTRY__PORT": "1", "VITRINE_REGISTRY__PROBE_TIMEOUT_S": "1"}


@pytest.mark.parametrize("args", [
    ["models", "show", "GRU-4"], ["models", "show", "gru4rec", "v3"], ["models", "show", "gru4rec", "0"],
    ["models", "list", "--verbose"], ["models", "show"], ["train", "--registry", "--no-such-flag"],
])
def test_bad_models_arguments_exit_2(args: list[str]) -> None:
    result = runner.invoke(app, args, env=CLOSED)
    assert result.exit_code == 2, result.output


def test_a_bad_registry_url_is_a_configuration_error() -> None:
    result = runner.invoke(app, ["models", "list"], env={"VITRINE_REGISTRY__URL": "ftp://mlflow"})
    assert result.exit_code == 2 and "registry.url" in result.output


def test_models_list_names_an_unreachable_registry() -> None:
    result = runner.invoke(app, ["models", "list"], env=CLOSED)
    assert result.exit_code == 1
    assert "http://127.0.0.1:1" in result.output and "does not answer" in result.output


def test_train_with_registry_fails_before_training_when_it_does_not_answer(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--preset", "tiny", "--epochs", "1", "--registry", "--out", str(tmp_path)], env=CLOSED)
    assert result.exit_code == 1 and "does not answer" in result.output
    assert not any(tmp_path.iterdir())  # nothing trained


def test_export_without_no_registry_refuses_to_write_when_the_registry_is_away(tmp_path: Path) -> None:
    run = tmp_path / "gru4rec-x"
    run.mkdir()
    (run / "run.json").write_text(json.dumps(RECORD))
    result = runner.invoke(app, ["export", str(run), "--no-gate", "--no-load"], env=CLOSED)
    assert result.exit_code == 1 and "--no-registry" in result.output
