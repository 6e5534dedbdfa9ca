"""Orders the steps, holds the lock, records everything, resumes and reproduces.

A step either succeeds (its numbers are recorded and the next step runs), or ends the run:
`stopped` (a data check failed), `rejected` (the gate said no, with its table), `failed` (an error).
Each step's inputs come from the record (window, fingerprint, run folders, champion versions), so a run
interrupted by a crash continues from its first unfinished step with `resume`, and `reproduce` retrains
from the recorded partitions and parameters.
"""

from __future__ import annotations

import asyncio
import json
import os
import traceback
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from vitrine.export.data.archive import load
from vitrine.export.data.table import EventTable
from vitrine.export.pipeline import evaluate as evaluation
from vitrine.export.pipeline import gating, publish, training
from vitrine.export.pipeline.champion import Champion, find_champion
from vitrine.export.pipeline.lock import PipelineLock
from vitrine.export.pipeline.record import FINAL, STEPS, FileRunRecorder, RunRecorder, new_run_id
from vitrine.export.pipeline.slices import category_function
from vitrine.export.pipeline.validate import Window, format_checks, validate
from vitrine.export.registry import CHALLENGER
from vitrine.settings import Settings

Report = Callable[[str], None]


class RunEnded(Exception):
    """A step ended the run with a decision (not an error): status and reason."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


REGISTRY_TAG_RUN, REGISTRY_TAG_TRIGGER, REGISTRY_TAG_CAUSE = "vitrine.pipeline.run_id", "vitrine.pipeline.trigger", "vitrine.pipeline.cause"
"""Tags on the registry's training run: which pipeline run produced it, its trigger, and what started it (e.g. the alerts)."""


class PipelineError(RuntimeError):
    """The command cannot do what was asked (unknown run, finished run, fingerprint mismatch)."""


class Pipeline:
    def __init__(self, settings: Settings, recorder: RunRecorder | None = None, report: Report = lambda line: None) -> None:
        self.settings = settings
        self.home = settings.pipeline_home
        self.recorder: RunRecorder = recorder or FileRunRecorder(self.home)
        self.report = report
        self._table: EventTable | None = None
        self._dataset = None

    # --- entry points -------------------------------------------------------------------------------------
    def run(self, trigger: str, window_days: int | None = None, until: date | None = None, run_id: str | None = None,
            no_champion: bool = False, cause: str = "") -> dict:
        run_id = run_id or new_run_id()
        with PipelineLock(self.home, run_id):
            self._mark_interrupted()
            p = self.settings.pipeline
            window = Window.trailing(until or datetime.now(UTC).date(), window_days or p.window_days)
            params = {"window": {"since": window.since.isoformat(), "until": window.until.isoformat()},
                      "archive_root": str(self.settings.pipeline_archive_root), "events_topic": self.settings.archive.events_topic,
                      "training": training.training_params(p), "model_names": {m: p.model_prefix + m for m in p.models},
                      "no_champion": no_champion, "gate": gating.policy(self.settings).__dict__, "gate_baselines": list(p.gate_baselines),
                      "category": {"source": p.category_source, "preset": p.category_preset, "seed": p.category_seed},
                      "repository": str(self.settings.triton.model_repository)}
            self.recorder.start(run_id, trigger, params, cause)
            self.report(f"pipeline run {run_id} (trigger {trigger}): window {window.since} … {window.until}")
            return self._continue(run_id)

    def resume(self, run_id: str) -> dict:
        with PipelineLock(self.home, run_id):
            record = self.recorder.load(run_id)
            if record["status"] not in ("running", "failed"):
                raise PipelineError(f"run {run_id} ended {record['status']} ({record['reason']}): nothing to resume")
            self.recorder.update(run_id, status="running", reason="", pid=os.getpid(),
                                 resumed_at=[*record.get("resumed_at", []), datetime.now(UTC).isoformat()])
            first = next((s for s in STEPS if record["steps"][s]["status"] != "succeeded"), None)
            self.report(f"resuming {run_id} at step {first}")
            return self._continue(run_id)

    def abandon(self, run_id: str) -> dict:
        """Mark a crashed run failed (its holder is gone: we hold the lock)."""
        with PipelineLock(self.home, run_id):
            record = self.recorder.load(run_id)
            if record["status"] != "running":
                raise PipelineError(f"run {run_id} is {record['status']}, not running")
            self.recorder.finish(run_id, "failed", "abandoned after a crash (`vitrine pipeline abandon`)")
            return self.recorder.load(run_id)

    # --- the steps -------------------------------------------------------------------------------------------
    def _continue(self, run_id: str) -> dict:
        steps = {"validate": self._validate, "train": self._train, "evaluate": self._evaluate, "gate": self._gate,
                 "export": self._export}
        for name in STEPS:
            record = self.recorder.load(run_id)
            if record["steps"][name]["status"] == "succeeded":
                continue
            self.recorder.step(run_id, name, "running")
            self.report(f"{name} …")
            try:
                fields = steps[name](record)
            except RunEnded as ended:
                self.recorder.step(run_id, name, ended.status, reason=ended.reason)
                self.recorder.finish(run_id, ended.status, ended.reason)
                self.report(f"{name}: {ended.status}")
                return self.recorder.load(run_id)
            except Exception as exc:  # noqa: BLE001 - any error fails the step with its reason; the run can be resumed
                reason = f"{type(exc).__name__}: {exc}"
                self.recorder.step(run_id, name, "failed", reason=reason, traceback=traceback.format_exc(limit=8))
                self.recorder.finish(run_id, "failed", f"step {name}: {reason}")
                self.report(f"{name}: failed ({reason})")
                return self.recorder.load(run_id)
            self.recorder.step(run_id, name, "succeeded", **fields)
        record = self.recorder.load(run_id)
        exported = record["steps"]["export"].get("models", {})
        loaded = ", ".join(f"{e['model']} v{e['version']}" for e in exported.values())
        self.recorder.finish(run_id, "succeeded", f"challenger exported and loaded: {loaded}")
        return self.recorder.load(run_id)

    def _window_table(self, record: dict) -> EventTable:
        if self._table is None:
            window = record["params"]["window"]
            self._table = load(Path(record["params"]["archive_root"]), window["since"], window["until"], record["params"]["events_topic"])
            recorded = record["steps"]["validate"].get("data", {}).get("fingerprint")
            if recorded and self._table.fingerprint() != recorded:
                raise PipelineError(f"the archive's window {window['since']} … {window['until']} changed since the run "
                                    f"validated it (fingerprint {self._table.fingerprint()[:12]} ≠ {recorded[:12]})")
        return self._table

    def _dataset_for(self, record: dict):  # noqa: ANN202
        if self._dataset is None:
            category_of, _ = category_function(self.settings.pipeline.model_copy(update={
                "category_source": record["params"]["category"]["source"], "category_preset": record["params"]["category"]["preset"],
                "category_seed": record["params"]["category"]["seed"]}))
            self._dataset = training.build_dataset(self._window_table(record), record["params"]["training"], category_of)
        return self._dataset

    def _champions(self, record: dict) -> dict[str, Champion | None]:
        """Each model's champion: the registry's `champion` alias; today's rule (the newest version Triton reports
        ready) only when the registry names none or does not answer — `Champion.source` says which, and the
        validate step records it."""
        if record["params"]["no_champion"]:
            return {m: None for m in record["params"]["model_names"]}
        repository = Path(record["params"]["repository"])
        aliased = self._registry_champions(record["params"]["model_names"].values())
        return {m: asyncio.run(find_champion(self.settings.triton.grpc_url, repository, name, *aliased[name]))
                for m, name in record["params"]["model_names"].items()}

    def _registry_champions(self, names) -> dict[str, tuple[int | None, str]]:  # noqa: ANN001 - iterable of names
        """Triton model name → (the Triton version its registry champion became, or None; why None)."""
        from vitrine.export.registry import RegistryError, RegistryMissing, connect

        try:
            registry = connect(self.settings.registry, "the pipeline reads the champion alias")
        except RegistryMissing as exc:
            return {name: (None, f"the registry does not answer: {exc}") for name in names}
        found: dict[str, tuple[int | None, str]] = {}
        for name in names:
            try:
                champion = registry.champion(name)
                found[name] = ((registry.triton_version(name, str(champion.version)), "") if champion is not None
                               else (None, "the registry has no champion alias"))
            except RegistryError as exc:
                found[name] = (None, f"the registry's champion is unusable: {exc}")
        return found

    def _protected(self, model_name: str) -> frozenset[int]:
        """Versions `prune` must keep: the registry's aliases and the experiment's pins (export/aliases.py)."""
        from vitrine.export.aliases import protected_versions

        return asyncio.run(protected_versions(self.settings, self._registry(), model_name))

    def _validate(self, record: dict) -> dict:
        window = Window(date.fromisoformat(record["params"]["window"]["since"]), date.fromisoformat(record["params"]["window"]["until"]))
        champions = self._champions(record)
        vocabularies = [c.vocabulary_set for c in champions.values() if c is not None]
        known = set().union(*vocabularies) if vocabularies else None
        result = validate(Path(record["params"]["archive_root"]), record["params"]["events_topic"], window,
                          self.settings.pipeline, known)
        fields: dict[str, Any] = {"checks": result.as_record(),
                                  "champions": {m: c and c.version for m, c in champions.items()},
                                  "champion_sources": {m: c.source if c else "none: no champion alias and no ready version"
                                                       for m, c in champions.items()}}
        for m, c in champions.items():
            self.report(f"{m}: champion " + (f"v{c.version} ({c.source})" if c else "none (baselines only)"))
        if not result.passed:
            self.recorder.step(record["run_id"], "validate", "running", **fields)
            self.report(format_checks(result.checks))
            failed = "; ".join(f"{c.check}: {c.value} (needs {c.threshold})" for c in result.failures())
            raise RunEnded("stopped", f"data check failed: {failed}")
        table = result.table
        assert table is not None
        self._table = table
        fields["data"] = {"fingerprint": table.fingerprint(), "events": len(table),
                          "users": len(set(table.user_id.tolist())), "items": len(set(table.item_id.tolist())),
                          "since": window.since.isoformat(), "until": window.until.isoformat()}
        self.report(format_checks(result.checks))
        return fields

    def _train(self, record: dict) -> dict:
        dataset, categories = self._dataset_for(record)
        data = record["steps"]["validate"]["data"]
        info = {"source": f"archive:{record['params']['archive_root']}", **data}
        out = self.recorder.artefacts(record["run_id"]) / "train"
        runs = training.train_all(dataset, info, record["params"]["training"], out)
        metrics = {m: json.loads((Path(r) / "run.json").read_text())["metrics"]["model"] for m, r in runs.items()}
        return {"runs": runs, "metrics": metrics, "categories": categories, "cutoff_ms": dataset.cutoff_ms,
                "validation_rows": len(dataset.valid_targets)}

    def _evaluate(self, record: dict) -> dict:
        dataset, _ = self._dataset_for(record)
        champions = self._champions(record)
        results = {}
        for model, run_dir in record["steps"]["train"]["runs"].items():
            champion = champions[model]
            results[model] = {**evaluation.evaluate(Path(run_dir), dataset, champion),
                              "champion_version": champion and champion.version,
                              "champion_source": champion.source if champion else None}
        return {"models": results}

    def _gate(self, record: dict) -> dict:
        policy = gating.policy(self.settings)
        decisions = {}
        for model, run_dir in record["steps"]["train"]["runs"].items():
            run_record = json.loads((Path(run_dir) / "run.json").read_text())
            decision = gating.decide(run_record, record["steps"]["evaluate"]["models"][model], policy,
                                     tuple(record["params"]["gate_baselines"]))
            decisions[model] = gating.decision_record(decision)
            self.report(f"{model}: gate {'accepted' if decision.accepted else 'REJECTED'}\n{decision.format()}")
        if not any(d["accepted"] for d in decisions.values()):
            self.recorder.step(record["run_id"], "gate", "running", models=decisions)
            reasons = "; ".join(f"{m}: {_first(d['reasons'])}" for m, d in decisions.items())
            raise RunEnded("rejected", f"no candidate passed the gate — {reasons}")
        return {"models": decisions}

    def _export(self, record: dict) -> dict:
        exported = dict(record["steps"]["export"].get("models", {}))  # a resumed export keeps what it already wrote
        p = self.settings.pipeline
        accepted = [m for m, decision in record["steps"]["gate"]["models"].items() if decision["accepted"]]
        registry = self._registry() if any(not exported.get(m, {}).get("registered") for m in accepted) else None
        for model in accepted:
            if exported.get(model, {}).get("registered"):
                if "card" not in exported[model]:  # resumed after the version was registered but before its card
                    exported[model] = {**exported[model], "card": self._card(record, model, exported[model], registry)}
                    self.recorder.step(record["run_id"], "export", "running", models=exported)
                continue
            run_dir = Path(record["steps"]["train"]["runs"][model])
            if model not in exported:
                # Lineage first: the training run (params, data fingerprint, metrics, artefacts) is in the registry
                # before a version exists, and the version's files go there too (the gateway reads its metadata there).
                logged = registry.log_training_run(run_dir, source=f"vitrine pipeline {record['run_id']}")
                registry.tag_run(logged.run_id, {REGISTRY_TAG_RUN: record["run_id"], REGISTRY_TAG_TRIGGER: record["trigger"],
                                                 **({REGISTRY_TAG_CAUSE: record["cause"]} if record.get("cause") else {})})
                name = record["params"]["model_names"][model]
                exported[model] = {**publish.write_version(run_dir, Path(record["params"]["repository"]), name, p.max_k,
                                                           p.keep_versions, publish=registry.publisher(logged.run_id),
                                                           protected=self._protected(name)),
                                   "registry_run_id": logged.run_id}
                self.recorder.step(record["run_id"], "export", "running", models=exported)
            if not exported[model].get("loaded"):
                exported[model] = publish.load_version(exported[model], self.settings.triton.grpc_url)
                self.recorder.step(record["run_id"], "export", "running", models=exported)
            name, version = exported[model]["model"], exported[model]["version"]
            registered = registry.register_version(name, exported[model]["registry_run_id"], version,
                                                   description=f"pipeline run {record['run_id']} (trigger {record['trigger']})")
            registry.set_alias(name, CHALLENGER, registered.version)
            exported[model] = {**exported[model], "registered": {"name": name, "version": registered.version, "alias": CHALLENGER}}
            self.recorder.step(record["run_id"], "export", "running", models=exported)
            exported[model] = {**exported[model], "card": self._card(record, model, exported[model], registry)}
            self.recorder.step(record["run_id"], "export", "running", models=exported)
            self.report(f"{name} v{version}: exported, loaded and parity-checked in Triton; registered as version "
                        f"{registered.version} (alias {CHALLENGER})")
        return {"models": exported}

    def _card(self, record: dict, model: str, exported: dict, registry) -> dict:  # noqa: ANN001 - export.registry.Registry
        """The registered challenger's model card (data, champion and baselines overall and per slice, explained
        examples), logged to its run in the registry. A card that cannot be made is reported, not fatal: the
        challenger is registered and loaded either way; {"error": …} is recorded and `vitrine models card` says so."""
        from vitrine.export import model_card

        registered = exported["registered"]
        try:
            uri = model_card.log_to_registry(
                registry, Path(record["steps"]["train"]["runs"][model]), Path(exported["folder"]),
                {**registered, "triton_version": exported["version"], "run_id": exported["registry_run_id"]},
                evaluation=record["steps"]["evaluate"]["models"].get(model), gate=record["steps"]["gate"]["models"].get(model))
        except Exception as exc:  # noqa: BLE001 - the card documents a registered version; it must not undo it
            self.report(f"{registered['name']} version {registered['version']}: no model card ({exc!r})")
            return {"error": repr(exc)}
        self.report(f"{registered['name']} version {registered['version']}: model card logged at {uri}")
        return {"uri": uri}

    def _registry(self):  # noqa: ANN202 - export.registry.Registry (mlflow is imported only when a run exports)
        """The model registry every challenger is registered in: without it nothing is exported (the step fails and
        `vitrine pipeline resume` continues once it answers) — a served version without lineage is what this prevents."""
        from vitrine.export.registry import RegistryMissing, connect

        try:
            return connect(self.settings.registry, "nothing was exported")
        except RegistryMissing as exc:
            raise PipelineError(str(exc)) from exc

    # --- bookkeeping ---------------------------------------------------------------------------------------
    def _mark_interrupted(self) -> None:
        """Runs still `running` while we hold the lock lost their process: mark them failed (resumable)."""
        for record in self.recorder.runs():
            if record["status"] == "running":
                self.recorder.finish(record["run_id"], "failed",
                                     f"interrupted: its process (pid {record.get('pid')}) ended without finishing; "
                                     "`vitrine pipeline resume` continues it")

    # --- reproduce -------------------------------------------------------------------------------------------
    def reproduce(self, run_id: str) -> dict:
        """Retrain from the recorded partitions and parameters; compare the metrics with the recorded ones."""
        record = self.recorder.load(run_id)
        train_step = record["steps"]["train"]
        if train_step["status"] != "succeeded":
            raise PipelineError(f"run {run_id} has no finished training to reproduce (train step: {train_step['status']})")
        with PipelineLock(self.home, run_id):
            self._window_table(record)  # raises PipelineError when the fingerprint differs
            dataset, _ = self._dataset_for(record)
            out = self.recorder.artefacts(run_id) / f"reproduce-{datetime.now(UTC):%Y%m%dT%H%M%S}"
            info = {"source": f"archive:{record['params']['archive_root']}", **record["steps"]["validate"]["data"]}
            runs = training.train_all(dataset, info, record["params"]["training"], out)
        tolerance = self.settings.pipeline.reproduce_tolerance
        comparison = {}
        for model, run_dir in runs.items():
            again = json.loads((Path(run_dir) / "run.json").read_text())["metrics"]["model"]
            before = train_step["metrics"][model]
            diffs = {k: abs(again[k] - before[k]) for k in before}
            comparison[model] = {"recorded": before, "reproduced": again, "max_abs_diff": max(diffs.values()),
                                 "equal": all(d <= tolerance for d in diffs.values())}
        result = {"at": datetime.now(UTC).isoformat(), "tolerance": tolerance, "models": comparison,
                  "equal": all(c["equal"] for c in comparison.values())}
        self.recorder.update(run_id, reproductions=[*record.get("reproductions", []), result])
        return result


def _first(reasons: list[str], shown: int = 3) -> str:
    """The first few of a gate's reasons (the record's gate step holds all of them and the whole table)."""
    more = f" (+{len(reasons) - shown} more)" if len(reasons) > shown else ""
    return " / ".join(reasons[:shown]) + more


def is_final(record: dict) -> bool:
    return record["status"] in FINAL
