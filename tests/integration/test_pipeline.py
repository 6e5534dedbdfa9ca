"""`vitrine pipeline` and the trigger service on the real stack: Kafka → archive consumer → Parquet → pipeline,
the served champion re-measured from Triton's repository, exports loaded through Triton's repository API.

Each test has its own pipeline home (runs, lock), archive root and, where it exports, a private model name in
the test stack's copy of the model repository, unloaded and removed at the end. The pipeline runs as the CLI
subprocess, configured through the environment exactly as the trigger service starts it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException

from tests.integration.invariants import eventually
from tests.integration.test_archive import _ready, _records, _send, _stop, lane  # noqa: F401 - `lane` is a fixture
from tests.pipeline_data import recent, write_archive, write_file_without
from vitrine.export.data.table import EventTable
from vitrine.services.stack import Stack
from vitrine.services.stack.components import settings_env
from vitrine.services.stack.launcher import free_port
from vitrine.settings import GateSettings, PipelineSettings, Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
QUICK = {"models": ["gru4rec"], "epochs": 1, "min_events": 100, "max_empty_hour_share": 1.0, "window_days": 30,
         "threads": 1, "category_preset": "tiny"}
"""Tiny, fast runs: one architecture, one epoch; the synthetic data has hours without sessions."""


def pipeline_settings(base: Settings, home: Path, archive_root: Path, **pipeline: object) -> Settings:
    return base.model_copy(update={
        "stack": base.stack.model_copy(update={"home": home}),
        "archive": base.archive.model_copy(update={"root": archive_root}),
        "pipeline": PipelineSettings(**{**QUICK, **pipeline}),
        "gate": GateSettings(),  # the defaults, not the test stack's (which does not judge slices)
    })


def vitrine(settings: Settings, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitrine", *args], env={**os.environ, **settings_env(settings)},
                          capture_output=True, text=True, timeout=timeout)


def record_of(settings: Settings, run_id: str) -> dict:
    return json.loads((settings.pipeline_home / "runs" / run_id / "record.json").read_text())


async def test_a_weak_candidate_from_the_kafka_fed_archive_is_rejected_against_the_served_champion(lane, tmp_path: Path) -> None:  # noqa: ANN001, F811
    table = recent("tiny")
    events = list(table.events())
    await _send(lane, _records(events))
    process, archive_settings = lane.start(flush_interval_s=0.5)
    try:
        await _ready(process, archive_settings)
        await lane.wait_committed(len(events), process)
    finally:
        _stop(process)
    # The stack serves gru4rec v1 (trained on the default storefront, whose i<n> ids the tiny one shares): the champion.
    settings = pipeline_settings(archive_settings, tmp_path / "home", archive_settings.archive_root)
    done = vitrine(settings, "pipeline", "run", "--json")
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(done.stdout)
    assert record["status"] == "rejected" and "recall@10" in record["reason"]
    assert record["steps"]["validate"]["data"]["events"] == len(events)
    evaluated = record["steps"]["evaluate"]["models"]["gru4rec"]
    # The champion was trained on another storefront's catalogue, so its figures here may be 0: what matters is that
    # it was run on these rows (every metric present), not copied from its old run record.
    assert evaluated["champion_version"] == 1 and set(evaluated["champion"]["overall"]) == {"recall@10", "recall@20", "ndcg@10", "mrr"}
    assert evaluated["champion"]["slices"]["returning shoppers"]["rows"] > 0
    table_rows = record["steps"]["gate"]["models"]["gru4rec"]["table"]
    against = {row["against"] for row in table_rows}
    assert "champion" in against and any("strongest baseline" in a for a in against)
    assert any(row["check"].startswith("slice 'category ") for row in table_rows)
    assert record["steps"]["export"]["status"] == "pending"
    listed = vitrine(settings, "pipeline", "list")
    assert record["run_id"] in listed.stdout and "rejected" in listed.stdout


async def test_a_partition_without_a_column_stops_the_run_with_the_reason(stack: Stack, tmp_path: Path) -> None:
    table = recent("tiny")
    write_archive(tmp_path / "archive", table)
    bad = write_file_without(tmp_path / "archive", table.take(slice(0, 20)), "user_id")  # type: ignore[arg-type]
    settings = pipeline_settings(stack.settings, tmp_path / "home", tmp_path / "archive")
    done = vitrine(settings, "pipeline", "run")
    assert done.returncode == 4, done.stdout + done.stderr
    assert "schema" in done.stdout and bad.name in done.stdout and "missing user_id" in done.stdout and "FAIL" in done.stdout
    run_id = next(p.name for p in (settings.pipeline_home / "runs").iterdir())
    record = record_of(settings, run_id)
    assert record["status"] == "stopped" and "schema" in record["reason"]
    assert record["steps"]["validate"]["status"] == "stopped" and record["steps"]["train"]["status"] == "pending"


def _without_training_events_of(table: EventTable, categories: np.ndarray, category: str, late: np.ndarray) -> EventTable:
    """The table minus `category`'s events before the validation cut (`late`: at or after it): a candidate trained on
    it never saw that category."""
    keep = ~((categories == category) & ~late)
    return EventTable(table.event_id[keep], table.user_id[keep], table.item_id[keep], table.type[keep], table.ts_ms[keep])


async def test_a_candidate_blind_to_one_category_beats_the_champion_overall_and_is_rejected_by_that_slice(stack: Stack, tmp_path: Path) -> None:
    """The classic failure an aggregate hides, planted: the champion (one epoch on all events) is served; the candidate
    trains six epochs on the same window with one category's training events missing (a producer that lost that
    category's pages), so it cannot rank that category's items. It wins overall by far, and the gate rejects it by the
    slice alone."""
    from vitrine.export.pipeline import training
    from vitrine.export.pipeline.publish import load_version, write_version
    from vitrine.export.pipeline.slices import synthetic_categories

    prefix = f"s{uuid.uuid4().hex[:6]}_"
    name, table = prefix + "gru4rec", recent("small")
    settings = pipeline_settings(stack.settings, tmp_path / "home", tmp_path / "archive", model_prefix=prefix, epochs=6,
                                 gate_baselines=["popularity"], category_preset="small")
    category_of = synthetic_categories("small", settings.pipeline.category_seed)
    params = {**training.training_params(settings.pipeline), "epochs": 1}
    champion_data, _ = training.build_dataset(table, params, category_of)
    champion_run = training.train_all(champion_data, {"fingerprint": "champion-all-categories"}, params, tmp_path / "champion")["gru4rec"]
    repository = stack.settings.triton.model_repository
    try:
        served = write_version(Path(champion_run), repository, name, settings.pipeline.max_k, settings.pipeline.keep_versions)
        await asyncio.to_thread(load_version, served, stack.settings.triton.grpc_url)
        # The planted category: the one with the most validation targets, so that its slice is judged, not just shown.
        categories = category_of(table.item_id)
        late = table.ts_ms >= np.quantile(table.ts_ms, 1 - settings.pipeline.validation_fraction)
        values, counts = np.unique(categories[late], return_counts=True)
        planted = str(values[np.argmax(counts)])
        write_archive(tmp_path / "archive", _without_training_events_of(table, categories, planted, late))
        done = await asyncio.to_thread(vitrine, settings, "pipeline", "run", "--json")
    finally:
        await _unload(stack, name)
        shutil.rmtree(repository / name, ignore_errors=True)
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(done.stdout)
    evaluated = record["steps"]["evaluate"]["models"]["gru4rec"]
    assert evaluated["champion_version"] == served["version"]
    rows = record["steps"]["gate"]["models"]["gru4rec"]["table"]
    overall = [r for r in rows if r["check"].startswith("overall")]
    assert overall and all(r["passed"] for r in overall), overall  # it wins overall: recall@10 by the margin, the rest too
    lost = {r["check"] for r in rows if r["passed"] is False}
    assert f"slice 'category {planted}'" in lost, rows
    ours = evaluated["candidate"]["slices"][f"category {planted}"]
    theirs = evaluated["champion"]["slices"][f"category {planted}"]
    print(f"\nPLANTED-SLICE category {planted}: overall recall@10 candidate {evaluated['candidate']['overall']['recall@10']:.4f} "
          f"vs champion {evaluated['champion']['overall']['recall@10']:.4f}; slice {ours['recall@10']:.4f} vs {theirs['recall@10']:.4f} "
          f"({ours['rows']} rows); lost: {sorted(lost)}")
    # Near 0, not exactly: without the category's early events the run's time cut moves a little later, so the few
    # events between the two cuts are the candidate's whole knowledge of the category.
    assert ours["recall@10"] < 0.1 * theirs["recall@10"] and ours["rows"] >= settings.gate.min_slice_rows
    assert any(f"category {planted}" in reason for reason in record["steps"]["gate"]["models"]["gru4rec"]["reasons"])


async def _unload(stack: Stack, name: str) -> None:
    client = triton.InferenceServerClient(stack.settings.triton.grpc_url)
    try:
        await client.unload_model(name)
    except InferenceServerException:
        pass
    finally:
        await client.close()


@pytest.fixture(scope="module")
def passed_run(stack: Stack, tmp_path_factory: pytest.TempPathFactory):
    """A run that passes the gate: a private model name (no champion served), gated against popularity only
    (slices not judged: the tiny validation set is too small), exported into the test stack's repository."""
    tmp = tmp_path_factory.mktemp("passed")
    prefix = f"t{uuid.uuid4().hex[:6]}_"
    write_archive(tmp / "archive", recent("small"))
    settings = pipeline_settings(stack.settings, tmp / "home", tmp / "archive", model_prefix=prefix, epochs=6,
                                 gate_baselines=["popularity"], category_preset="small")
    settings = settings.model_copy(update={"gate": settings.gate.model_copy(update={"min_slice_rows": 1_000_000})})
    done = vitrine(settings, "pipeline", "run", "--json")
    name = prefix + "gru4rec"
    yield settings, done, name
    asyncio.run(_unload(stack, name))
    shutil.rmtree(stack.settings.triton.model_repository / name, ignore_errors=True)


async def test_a_run_that_passes_the_gate_exports_and_loads_a_version_in_triton(stack: Stack, passed_run) -> None:  # noqa: ANN001
    settings, done, name = passed_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(done.stdout)
    exported = record["steps"]["export"]["models"]["gru4rec"]
    assert record["status"] == "succeeded" and exported["model"] == name and exported["version"] == 1 and exported["loaded"]
    assert (stack.settings.triton.model_repository / name / "1" / "model.onnx").is_file()
    client = triton.InferenceServerClient(stack.settings.triton.grpc_url)
    try:
        assert await client.is_model_ready(name, "1")
    finally:
        await client.close()
    assert record["steps"]["evaluate"]["models"]["gru4rec"]["champion_version"] is None


def test_the_challenger_is_registered_with_its_lineage(stack: Stack, passed_run) -> None:  # noqa: ANN001
    """The exported version is a registered model version with alias challenger, linked to its Triton version and to a
    training run that names the pipeline run, its trigger and the data fingerprint."""
    from vitrine.export import registry as names
    from vitrine.export.registry import Registry

    settings, done, name = passed_run
    record = json.loads(done.stdout)
    exported = record["steps"]["export"]["models"]["gru4rec"]
    assert exported["registered"] == {"name": name, "version": exported["registered"]["version"], "alias": "challenger"}
    client = Registry(stack.settings.registry.tracking_url, stack.settings.registry.experiment).client
    version = client.get_model_version_by_alias(name, "challenger")
    assert version.version == exported["registered"]["version"] and version.run_id == exported["registry_run_id"]
    assert version.tags[names.VERSION_TAG_TRITON_VERSION] == str(exported["version"])
    run = client.get_run(version.run_id)
    assert run.data.tags["vitrine.pipeline.run_id"] == record["run_id"] and run.data.tags["vitrine.pipeline.trigger"] == "manual"
    assert run.data.tags[names.TAG_DATA_FINGERPRINT] == record["steps"]["validate"]["data"]["fingerprint"]
    # The pipeline logged the challenger's model card to the run; the version's tag points at it, the CLI prints it.
    from vitrine.export.model_card import CARD_FILES, SECTIONS

    assert exported["card"].get("uri") == version.tags[names.VERSION_TAG_CARD_URI], exported["card"]
    logged = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(version.run_id, names.card_artifact_dir(name, exported["version"]))}
    assert logged == set(CARD_FILES)
    printed = vitrine(settings, "models", "card", name, exported["registered"]["version"], timeout=60)
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert [line for line in printed.stdout.splitlines() if line in SECTIONS] == list(SECTIONS)
    assert record["steps"]["validate"]["data"]["fingerprint"] in printed.stdout


def test_reproduce_gives_the_same_metrics_and_refuses_a_changed_archive(passed_run) -> None:  # noqa: ANN001
    settings, done, _ = passed_run
    run_id = json.loads(done.stdout)["run_id"]
    again = vitrine(settings, "pipeline", "reproduce", run_id, "--json")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    result = json.loads(again.stdout)
    assert result["equal"] and result["models"]["gru4rec"]["max_abs_diff"] <= settings.pipeline.reproduce_tolerance
    # One more event inside the recorded window: the data is no longer what the run trained on.
    extra = recent("tiny", seed=99).take(slice(0, 1))  # type: ignore[arg-type]
    root = settings.archive_root
    write_archive(root, extra, partition=1)
    refused = vitrine(settings, "pipeline", "reproduce", run_id)
    assert refused.returncode == 1 and "fingerprint" in refused.stderr


TOKEN = "integration-token-0123456789abcdef"


async def test_the_webhook_refuses_bad_calls_and_a_valid_one_posted_twice_starts_exactly_one_run(stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    port = free_port()
    settings = pipeline_settings(stack.settings, tmp_path / "home", tmp_path / "archive")  # an empty archive: the run stops at validate
    settings = settings.model_copy(update={"triggers": settings.triggers.model_copy(update={
        "port": port, "token_file": tmp_path / "token", "debounce_s": 3600})})
    log = tmp_path / "triggers.log"
    with log.open("wb") as out:
        service = subprocess.Popen([sys.executable, "-m", "vitrine", "triggers", "run"], env={**os.environ, **settings_env(settings)},
                                   stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            async def healthy() -> bool | None:
                assert service.poll() is None, log.read_text()
                try:
                    return True if (await client.get(f"{url}/healthz")).status_code == 200 else None
                except httpx.HTTPError:
                    return None

            await eventually(healthy, 30, "the trigger service to answer /healthz")
            body = _notification()
            assert (await client.post(f"{url}/alerts", json=body)).status_code == 401
            wrong = await client.post(f"{url}/alerts", json=body, headers={"Authorization": "Bearer wrong-token"})
            assert wrong.status_code == 401 and "bearer" in wrong.json()["error"]
            auth = {"Authorization": f"Bearer {TOKEN}"}
            malformed = await client.post(f"{url}/alerts", content=b'{"version": "4", "alerts": "x"}', headers=auth)
            assert malformed.status_code == 400 and malformed.json()["details"]
            first, second = await asyncio.gather(client.post(f"{url}/alerts", json=body, headers=auth),
                                                 client.post(f"{url}/alerts", json=body, headers=auth))
            answers = sorted([(first.status_code, first.json()["status"]), (second.status_code, second.json()["status"])])
            assert answers == [(200, "duplicate"), (202, "started")]
            run_id = (first if first.status_code == 202 else second).json()["run_id"]
            later = await client.post(f"{url}/alerts", json=_notification("2026-12-01T12:00:00Z"), headers=auth)
            assert later.status_code == 200 and later.json()["status"] in ("busy", "debounced")

            async def finished() -> dict | None:
                path = settings.pipeline_home / "runs" / run_id / "record.json"
                record = json.loads(path.read_text()) if path.is_file() else None
                return record if record and record["status"] != "running" else None

            record = await eventually(finished, 120, "the triggered run to end")
            assert record["trigger"] == "drift" and record["status"] == "stopped"
            assert [p.name for p in (settings.pipeline_home / "runs").iterdir()] == [run_id]
            metrics = (await client.get(f"{url}/metrics")).text
            assert 'vitrine_triggers_runs_started_total{trigger="drift"} 1.0' in metrics
            assert 'vitrine_triggers_rejected_total{reason="duplicate"} 1.0' in metrics
            checked = subprocess.run(["promtool", "check", "metrics"], input=metrics, capture_output=True, text=True)
            assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr
    finally:
        _stop(service)


def _notification(starts_at: str = "2026-12-01T10:00:00Z") -> dict:
    return {"version": "4", "groupKey": '{}:{alertname="VitrineFeatureDrift"}', "truncatedAlerts": 0, "status": "firing",
            "receiver": "vitrine-pipeline", "groupLabels": {}, "commonLabels": {"action": "retrain"}, "commonAnnotations": {},
            "externalURL": "http://127.0.0.1:9093",
            "alerts": [{"status": "firing", "labels": {"alertname": "VitrineFeatureDrift", "action": "retrain"}, "annotations": {},
                        "startsAt": starts_at, "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "", "fingerprint": "0123abcd"}]}
