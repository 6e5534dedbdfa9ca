"""The model registry on the real stack: a training run logged with everything, an exported version registered
and served with its metadata from the registry, `vitrine models` reading it. Checked through MLflow's and
Triton's own REST APIs, against values read from the run folder in plain Python."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException
from typer.testing import CliRunner

from vitrine.cli import app
from vitrine.export.data import sequences, synthetic
from vitrine.export.registry import Registry
from vitrine.export.train import TrainConfig, train
from vitrine.services.gateway.ranking import ModelCatalog
from vitrine.services.stack import Stack
from vitrine.services.stack.components import settings_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
runner = CliRunner()


async def _vitrine(args: list[str], env: dict[str, str]):  # noqa: ANN202 - click's Result
    """`vitrine …` in a worker thread: the commands run their own event loop (asyncio.run)."""
    return await asyncio.to_thread(runner.invoke, app, args, env=env)


def _key(name: str) -> str:
    """The flattening rule as docs/registry.md states it, written out again here (not imported)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _expected_metrics(record: dict) -> dict[str, float]:
    expected = {}
    for ranker, metrics in record["metrics"].items():
        prefix = "model" if ranker == "model" else f"baseline.{ranker}"
        expected |= {f"{prefix}.{_key(m)}": v for m, v in metrics.items()}
    for ranker, slices in record["slice_metrics"].items():
        prefix = "model" if ranker == "model" else f"baseline.{ranker}"
        for slice_name, metrics in slices.items():
            expected |= {f"{prefix}.slice.{_key(slice_name)}.{_key(m)}": v for m, v in metrics.items() if m != "rows"}
            expected[f"slice.{_key(slice_name)}.rows"] = metrics["rows"]
    expected["duration_s"] = record["duration_s"]
    expected["baselines.duration_s"] = record["baselines"]["duration_s"]
    return expected


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch on the tiny storefront, through the Python API as `vitrine train --preset tiny --epochs 1` does it."""
    table = synthetic.generate(synthetic.preset("tiny", seed=7))
    dataset = sequences.build(table, max_len=20, validation_fraction=0.1, seed=7)
    info = {"source": "synthetic:tiny", "seed": 7, "drift_at_day": None, "fingerprint": table.fingerprint(), "events": len(table)}
    return train(TrainConfig(architecture="gru4rec", epochs=1, threads=1), dataset, info,
                 tmp_path_factory.mktemp("runs"), progress=False)


@pytest.fixture
def registry(stack: Stack) -> Registry:
    cfg = stack.settings.registry
    return Registry(cfg.tracking_url, cfg.experiment, cfg.timeout_s)


def _api(stack: Stack, endpoint: str, **params: str) -> dict:
    """MLflow's REST API read directly (not through export/registry.py, the code under test)."""
    reply = httpx.get(f"{stack.settings.registry.tracking_url}/api/2.0/mlflow/{endpoint}", params=params, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


def _artifacts(stack: Stack, run_id: str, path: str) -> set[str]:
    listed = _api(stack, "artifacts/list", run_id=run_id, path=path)
    return {Path(f["path"]).name for f in listed.get("files", [])}


def test_a_training_run_is_logged_with_params_metrics_tags_and_artifacts(stack: Stack, registry: Registry, tiny_run: Path) -> None:
    record = json.loads((tiny_run / "run.json").read_text())
    logged = registry.log_training_run(tiny_run, source="vitrine train")
    run = _api(stack, "runs/get", run_id=logged.run_id)["run"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == tiny_run.name
    experiment = _api(stack, "experiments/get", experiment_id=run["info"]["experiment_id"])["experiment"]
    assert experiment["name"] == stack.settings.registry.experiment

    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    for name, value in record["parameters"].items():
        assert params[name] == (value if isinstance(value, str) else json.dumps(value)), name
    assert params["data.source"] == "synthetic:tiny" and params["data.events"] == str(record["data"]["events"])

    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    expected = _expected_metrics(record)
    assert set(expected) <= set(metrics)
    assert all(metrics[k] == pytest.approx(v) for k, v in expected.items())
    assert {"baseline.transitions.recall_10", "baseline.popularity.recall_10", "baseline.cooccurrence.recall_10"} <= set(metrics)
    assert metrics["train.loss"] == pytest.approx(record["history"][-1]["loss"])

    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["vitrine.data_fingerprint"] == record["data"]["fingerprint"]
    assert tags["vitrine.code_version"] == record["code_version"] and tags["vitrine.source"] == "vitrine train"
    if record["code_version"] != "unknown":
        assert record["code_version"].startswith(tags["mlflow.source.git.commit"])
    assert tags["vitrine.run_folder"] == tiny_run.name and tags["vitrine.strongest_baseline"] == record["baselines"]["strongest"]

    assert _artifacts(stack, logged.run_id, "run") == {"run.json", "vocabulary.json", "model.pt"}
    # Logged once: the same folder again (e.g. by `vitrine export`) finds the run instead of adding one.
    again = registry.log_training_run(tiny_run, source="vitrine export")
    assert (again.run_id, again.created) == (logged.run_id, False)


@pytest.fixture
async def triton_client(stack: Stack) -> AsyncIterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(stack.settings.triton.grpc_url)
    yield client
    await client.close()


@pytest.fixture
def exported_name(stack: Stack) -> Iterator[str]:
    """A model name of this test's own in the stack's repository (removed afterwards; Triton unloads it)."""
    name = f"test_reg_{uuid.uuid4().hex[:8]}"
    yield name
    shutil.rmtree(stack.settings.triton.model_repository / name, ignore_errors=True)
    httpx.post(f"{stack.settings.triton.http_url}/v2/repository/models/{name}/unload", json={}, timeout=30)


async def test_an_exported_version_is_registered_served_and_listed(
    stack: Stack, tiny_run: Path, exported_name: str, triton_client: triton.InferenceServerClient, tmp_path: Path,
) -> None:
    env = settings_env(stack.settings)
    exported = await _vitrine(["export", str(tiny_run), "--name", exported_name, "--no-gate"], env)
    assert exported.exit_code == 0, exported.output
    assert f"{exported_name} v1: served by Triton" in exported.output

    # The registered version: from the run, tagged with the Triton model and version it became, alias challenger.
    version = _api(stack, "registered-models/alias", name=exported_name, alias="challenger")["model_version"]
    tags = {t["key"]: t["value"] for t in version.get("tags", [])}
    assert tags["triton.model"] == exported_name and tags["triton.version"] == "1"
    run = _api(stack, "runs/get", run_id=version["run_id"])["run"]
    assert {t["key"]: t["value"] for t in run["data"]["tags"]}["vitrine.run_folder"] == tiny_run.name
    assert _artifacts(stack, version["run_id"], f"triton/{exported_name}/1") == {"model.onnx", "metadata.json"}

    # Triton's config of the model says where version 1's metadata lives; the registry serves exactly the file on disk.
    config = httpx.get(f"{stack.settings.triton.http_url}/v2/models/{exported_name}/config", timeout=10).json()
    uri = config["parameters"]["vitrine.metadata.1"]["string_value"]
    assert uri == tags["vitrine.metadata_uri"] == f"runs:/{version['run_id']}/triton/{exported_name}/1/metadata.json"
    on_disk = json.loads((stack.settings.triton.model_repository / exported_name / "1" / "metadata.json").read_text())

    # The gateway's catalogue, given an empty model repository: it can only have learnt the vocabulary via the registry.
    empty = tmp_path / "no-shared-filesystem"
    empty.mkdir()
    catalog = ModelCatalog(triton_client, empty, refresh_s=60, call_timeout_s=5,
                           registry_url=stack.settings.registry.tracking_url, registry_timeout_s=10)
    served = await catalog.resolve(exported_name, "1")
    assert served.item_ids == tuple(on_disk["vocabulary"]) and served.max_k == on_disk["serving"]["max_k"]
    assert served.reference == on_disk["reference"]
    assert served.explains  # a fresh model folder: its config declares explain_steps, learnt from Triton's config API

    # `vitrine export` logged the version's model card to the run; `vitrine models card` prints it.
    from vitrine.export.model_card import CARD_FILES, SECTIONS

    assert f"{exported_name} version {version['version']}: model card logged" in exported.output, exported.output
    assert _artifacts(stack, version["run_id"], f"card/{exported_name}/1") == set(CARD_FILES)
    card = await _vitrine(["models", "card", exported_name, version["version"]], env)
    assert card.exit_code == 0 and [line for line in card.output.splitlines() if line in SECTIONS] == list(SECTIONS)
    no_card = await _vitrine(["models", "card", exported_name, "99"], env)
    assert no_card.exit_code == 1 and "no version 99" in no_card.output

    # `vitrine models list` and `show` read the registry.
    listed = await _vitrine(["models", "list", "--json"], env)
    assert listed.exit_code == 0, listed.output
    row = next(r for r in json.loads(listed.output) if r["name"] == exported_name)
    assert row["aliases"] == {"challenger": version["version"]} and row["latest_triton_version"] == "1"
    table = await _vitrine(["models", "list"], env)
    assert re.search(rf"^{exported_name}\s+1\s+v1\s+v1\s+challenger=v1$", table.output, re.MULTILINE), table.output
    shown = await _vitrine(["models", "show", exported_name, version["version"], "--json"], env)
    assert shown.exit_code == 0 and json.loads(shown.output)["metrics"]["model.recall_10"] == pytest.approx(
        json.loads((tiny_run / "run.json").read_text())["metrics"]["model"]["recall@10"])
    missing = await _vitrine(["models", "show", exported_name, "99"], env)
    assert missing.exit_code == 1 and "no version 99" in missing.output


async def test_a_version_whose_registry_entry_is_gone_is_not_served_from_disk(
    stack: Stack, tiny_run: Path, exported_name: str, triton_client: triton.InferenceServerClient,
) -> None:
    """A config that names a registry URI never falls back to a local file: a wrong registry is an error."""
    exported = await _vitrine(["export", str(tiny_run), "--name", exported_name, "--no-gate"], settings_env(stack.settings))
    assert exported.exit_code == 0, exported.output
    catalog = ModelCatalog(triton_client, stack.settings.triton.model_repository, refresh_s=60, call_timeout_s=5,
                           registry_url="http://127.0.0.1:9", registry_timeout_s=2)
    with pytest.raises((httpx.HTTPError, LookupError)):
        await catalog.resolve(exported_name, "1")
    with pytest.raises(InferenceServerException):  # and a model Triton does not know is not served at all
        await ModelCatalog(triton_client, stack.settings.triton.model_repository, 60, 5).resolve("test_reg_unknown", "1")
