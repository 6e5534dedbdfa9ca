"""The one module that knows how Vitrine uses the model registry (MLflow): names, tags, aliases, artifacts.

- **Runs.** Every training run folder (`export/train.py`) becomes one MLflow run in the experiment
  `registry.experiment` (default `vitrine-training`): its parameters, every metric of the model and of each
  counting baseline, overall and per slice, flattened (`model.recall_10`, `baseline.transitions.recall_10`,
  `model.slice.history_2_4.recall_10`), tags for lineage (code commit, data fingerprint, who logged it, the
  run folder) and the folder's files as artifacts under `run/`. Logging is idempotent: a run folder already
  in the registry (tag `vitrine.run_folder`) is found, not logged twice — so `vitrine export` can log a run
  that `vitrine train` could not.
- **Versions.** Registered model name = Triton model name. An exported version's `model.onnx` and
  `metadata.json` go to the run's artifacts under `triton/<model>/<triton version>/`; the registered version
  points there (`source`) and its tags say which Triton model and version it became.
- **Aliases.** `challenger`: the newest exported version, set by `vitrine export` and the pipeline; `champion`:
  the version declared the winner, set only through `promote` (which makes the previous champion the
  `fallback`); `fallback`: the champion before it, which `swap_to_fallback` (`vitrine models fallback`) puts
  back. Routing, the pipeline's champion and pruning all read these three; aliases move, versions never change.
- **Model cards.** A registered version's card (`export/model_card.py`: Markdown, HTML, the facts as JSON) is
  logged to its training run under `card/<model>/<triton version>/`; the version's tag `vitrine.card_uri` and
  its description point there, so the registry page leads to it.
- **Metadata for serving.** `metadata_uri` is what a Triton config carries per version
  (`parameters { key: "vitrine.metadata.<version>" }`): a `runs:/<run id>/<path>` URI the gateway resolves
  with `artifact_http_url` against its own registry URL — the gateway needs HTTP to the registry, never the
  model repository's filesystem.

MLflow's client calls block (HTTP with retries): services call them with `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import httpx

if TYPE_CHECKING:  # mlflow is the `registry` extra and slow to import: loaded only when a client is built
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from vitrine.settings import RegistrySettings

CHAMPION, CHALLENGER, FALLBACK = "champion", "challenger", "fallback"
ALIASES = (CHAMPION, CHALLENGER, FALLBACK)

TAG_SOURCE = "vitrine.source"
"""Which command logged the run (`vitrine train`, `vitrine export`)."""
TAG_RUN_FOLDER = "vitrine.run_folder"
"""The run folder's name (architecture, time, data fingerprint): how a folder is found again in the registry."""
TAG_MODEL = "vitrine.model"
TAG_CODE_VERSION = "vitrine.code_version"
TAG_DATA_FINGERPRINT = "vitrine.data_fingerprint"
TAG_DATA_SOURCE = "vitrine.data_source"
TAG_STRONGEST_BASELINE = "vitrine.strongest_baseline"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_RUN_NAME = "mlflow.runName"

VERSION_TAG_TRITON_MODEL = "triton.model"
VERSION_TAG_TRITON_VERSION = "triton.version"
VERSION_TAG_METADATA_URI = "vitrine.metadata_uri"
VERSION_TAG_CARD_URI = "vitrine.card_uri"

RUN_ARTIFACTS = ("run.json", "vocabulary.json", "model.pt")
"""The run folder's files logged under `run/` (the validation sample stays local: the export derives
`metadata.json`'s drift reference from it, and `metadata.json` is logged)."""
RUN_ARTIFACT_DIR = "run"
TRITON_ARTIFACT_DIR = "triton"
CARD_ARTIFACT_DIR = "card"
METADATA_PARAMETER_PREFIX = "vitrine.metadata."
"""Triton config parameter key prefix; the full key is this + the Triton version number."""

BASELINE_PREFIX = "baseline"
MODEL_PREFIX = "model"
SLICE_PREFIX = "slice"

# MLflow's REST limits per log_batch call (documented for LogBatch): more is split into several calls.
MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH, MAX_TAGS_PER_BATCH = 1000, 100, 100
MAX_PARAM_VALUE = 6000
"""MLflow's limit on a parameter value's length; longer values (none today) are cut with a marker."""

_UNSAFE = re.compile(r"[^a-z0-9]+")
_RUNS_URI = re.compile(r"^runs:/([0-9a-f]{32})/([A-Za-z0-9_./-]+)$")


class RegistryUnavailable(RuntimeError):
    """The registry did not answer; the message says where it was looked for and how to go on without it."""


class RegistryError(ValueError):
    """The registry answered, but not what Vitrine expects (unknown model or version, a malformed URI)."""


# --- names: pure functions, unit-tested ------------------------------------------------------------------

def metric_key(name: str) -> str:
    """An evaluation name as an MLflow key segment: `recall@10` → `recall_10`, `history 2-4` → `history_2_4`.

    MLflow keys allow more, but one rule for every segment keeps names predictable for queries and the UI."""
    key = _UNSAFE.sub("_", name.lower()).strip("_")
    if not key:
        raise ValueError(f"{name!r} has no letters or digits to name a metric by")
    return key


def flatten_metrics(record: dict[str, Any]) -> dict[str, float]:
    """Every number of a run record's evaluation, flat: model and each baseline, overall and per slice.

    `model.recall_10`, `baseline.transitions.recall_10`, `model.slice.history_1.recall_10`,
    `baseline.popularity.slice.head_items.mrr`, `slice.history_1.rows` (rows are the same for every ranker),
    `duration_s` (training and the model's evaluation) and `baselines.duration_s`."""
    flat: dict[str, float] = {}
    for ranker, metrics in record["metrics"].items():
        prefix = MODEL_PREFIX if ranker == "model" else f"{BASELINE_PREFIX}.{metric_key(ranker)}"
        for name, value in metrics.items():
            flat[f"{prefix}.{metric_key(name)}"] = float(value)
    for ranker, slices in record.get("slice_metrics", {}).items():
        prefix = MODEL_PREFIX if ranker == "model" else f"{BASELINE_PREFIX}.{metric_key(ranker)}"
        for slice_name, metrics in slices.items():
            for name, value in metrics.items():
                if name == "rows":
                    flat[f"{SLICE_PREFIX}.{metric_key(slice_name)}.rows"] = float(value)
                else:
                    flat[f"{prefix}.{SLICE_PREFIX}.{metric_key(slice_name)}.{metric_key(name)}"] = float(value)
    flat["duration_s"] = float(record["duration_s"])
    if "duration_s" in record.get("baselines", {}):
        flat["baselines.duration_s"] = float(record["baselines"]["duration_s"])
    return flat


def _param_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


def flatten_params(record: dict[str, Any]) -> dict[str, str]:
    """What was chosen before training: hyper-parameters as named in TrainConfig, the data (`data.*`, except
    the fingerprint, a tag) and the baselines' configuration (`baselines.*`)."""
    params = {name: _param_value(value) for name, value in record["parameters"].items()}
    for name, value in record.get("data", {}).items():
        if name != "fingerprint":
            params[f"data.{name}"] = _param_value(value)
    baselines = record.get("baselines", {})
    for name, value in baselines.get("config", {}).items():
        params[f"baselines.{name}"] = _param_value(value)
    if "metric" in baselines:
        params["baselines.metric"] = str(baselines["metric"])
    return params


def run_tags(record: dict[str, Any], run_folder: str, source: str) -> dict[str, str]:
    """Lineage: which code and data made the run, which command logged it, which folder it came from."""
    code = str(record.get("code_version", "unknown"))
    tags = {
        TAG_RUN_NAME: run_folder,
        TAG_RUN_FOLDER: run_folder,
        TAG_SOURCE: source,
        TAG_MODEL: str(record["model"]),
        TAG_CODE_VERSION: code,
        TAG_DATA_FINGERPRINT: str(record.get("data", {}).get("fingerprint", "unknown")),
        TAG_DATA_SOURCE: str(record.get("data", {}).get("source", "unknown")),
    }
    commit = code.removesuffix("-dirty")
    if re.fullmatch(r"[0-9a-f]{7,40}", commit):
        tags[TAG_GIT_COMMIT] = commit
    if "strongest" in record.get("baselines", {}):
        tags[TAG_STRONGEST_BASELINE] = str(record["baselines"]["strongest"])
    return tags


def triton_artifact_dir(model: str, triton_version: int) -> str:
    return f"{TRITON_ARTIFACT_DIR}/{model}/{triton_version}"


def card_artifact_dir(model: str, triton_version: int | str) -> str:
    return f"{CARD_ARTIFACT_DIR}/{model}/{triton_version}"


def metadata_uri(run_id: str, model: str, triton_version: int, file_name: str = "metadata.json") -> str:
    """Where a version's metadata lives in the registry, as written into its Triton config."""
    return f"runs:/{run_id}/{triton_artifact_dir(model, triton_version)}/{file_name}"


def metadata_parameter(triton_version: int | str) -> str:
    return f"{METADATA_PARAMETER_PREFIX}{triton_version}"


def parse_runs_uri(uri: str) -> tuple[str, str]:
    """`runs:/<32 hex run id>/<path>` → (run id, path); anything else is refused (it came from a config file)."""
    match = _RUNS_URI.fullmatch(uri)
    if not match or ".." in match.group(2).split("/"):
        raise RegistryError(f"{uri!r} is not a runs:/<run id>/<artifact path> URI")
    return match.group(1), match.group(2)


def artifact_http_url(tracking_url: str, uri: str) -> str:
    """The registry's HTTP download URL of a `runs:/` artifact (the server's `get-artifact` endpoint, which
    reads from its own artifact store: the caller needs no storage credentials and no shared filesystem)."""
    run_id, path = parse_runs_uri(uri)
    return f"{tracking_url.rstrip('/')}/get-artifact?{urlencode({'path': path, 'run_uuid': run_id})}"


def promotion_moves(aliases: dict[str, str], version: str) -> dict[str, str]:
    """The alias changes of promoting `version` to champion, given the model's aliases (alias → version):
    `champion` → `version`, and the previous champion (if another version) becomes `fallback`.

    Promoting the champion again changes nothing (idempotent, so a retried promotion cannot lose the fallback);
    promoting the fallback itself leaves `fallback` on the old champion (a swap)."""
    if not VERSION_NUMBER.fullmatch(str(version)):
        raise RegistryError(f"{version!r} is not a registry version (a positive whole number)")
    previous = aliases.get(CHAMPION)
    if previous == str(version):
        return {}
    moves = {CHAMPION: str(version)}
    if previous is not None:
        moves[FALLBACK] = previous
    return moves


def fallback_moves(aliases: dict[str, str]) -> dict[str, str]:
    """The alias changes of `vitrine models fallback`: the `fallback` version becomes `champion`, the old champion
    becomes `fallback` (so a second fallback undoes the first). Refused without a fallback, or when it already is
    the champion."""
    fallback = aliases.get(FALLBACK)
    if fallback is None:
        raise RegistryError("no version has the alias `fallback` (a version becomes the fallback when another is "
                            "promoted to champion after it)")
    if aliases.get(CHAMPION) == fallback:
        raise RegistryError(f"version {fallback} is both champion and fallback: nothing to fall back to (a promotion "
                            "that stopped half-way: `vitrine models promote` of the intended champion finishes it)")
    return promotion_moves(aliases, fallback)


VERSION_NUMBER = re.compile(r"[1-9][0-9]{0,9}")


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- the client ------------------------------------------------------------------------------------------

class RegistryMissing(RuntimeError):
    """The registry is required but does not answer."""


def connect(cfg: RegistrySettings, why: str) -> Registry:
    """A client of the configured registry, after a quick reachability check whose error names the URL, what
    needed the registry (`why`) and the way out."""
    reason = reachable(cfg.tracking_url, cfg.probe_timeout_s)
    if reason is not None:
        raise RegistryMissing(
            f"the model registry at {cfg.tracking_url} does not answer ({reason}); {why}. Start it with "
            f"`vitrine stack up` (component mlflow) or set VITRINE_REGISTRY__URL")
    return Registry(cfg.tracking_url, cfg.experiment, cfg.timeout_s)


def reachable(tracking_url: str, timeout_s: float) -> str | None:
    """None when the registry answers /health, else why not: decided in seconds, before MLflow's own client
    (which retries for minutes) is asked anything."""
    try:
        response = httpx.get(f"{tracking_url.rstrip('/')}/health", timeout=timeout_s)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None if response.status_code == 200 else f"/health answered {response.status_code}"


@dataclass(frozen=True)
class LoggedRun:
    run_id: str
    experiment_id: str
    created: bool
    """False when the folder was already in the registry (found by its TAG_RUN_FOLDER)."""


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    triton_version: int
    source: str


class Registry:
    """Vitrine's view of one MLflow server. Blocking: call from a worker thread in async code."""

    def __init__(self, tracking_url: str, experiment: str, timeout_s: float = 10.0, max_retries: int = 2) -> None:
        # MLflow reads its HTTP timeout and retry count from the environment only; its defaults (120 s, 7
        # retries with back-off) would hold a command for minutes when the server is away.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, timeout_s))))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))
        # MLflow writes "🏃 View run … at: …" to stdout when a run ends, which would corrupt `--json` output
        # (the pipeline's, for one); Vitrine prints its own links.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        from mlflow import MlflowClient

        self.tracking_url = tracking_url.rstrip("/")
        self.experiment = experiment
        self.client: MlflowClient = MlflowClient(tracking_uri=self.tracking_url, registry_uri=self.tracking_url)

    # runs ---------------------------------------------------------------------------------------------
    def experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(self.experiment, tags={"vitrine.about": "training runs of Vitrine's rankers"})
        except MlflowException:  # created meanwhile by another process
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def find_run(self, run_folder: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id()], filter_string=f"tags.`{TAG_RUN_FOLDER}` = '{_quote(run_folder)}'", max_results=1)
        return runs[0].info.run_id if runs else None

    def log_training_run(self, run_dir: Path, source: str) -> LoggedRun:
        """Log a finished run folder (params, metrics, tags, artifacts); a folder logged before is returned as is."""
        from mlflow.entities import Metric, Param

        for name in RUN_ARTIFACTS:
            if not (run_dir / name).is_file():
                raise FileNotFoundError(f"{run_dir} is not a complete run folder: {name} is missing")
        record = json.loads((run_dir / "run.json").read_text())
        try:  # computed before anything is logged: a malformed record leaves no half-logged run behind
            metric_values, param_values = flatten_metrics(record), flatten_params(record)
            tags = run_tags(record, run_dir.name, source)
        except (KeyError, TypeError, ValueError) as exc:
            raise RegistryError(f"{run_dir / 'run.json'} is not a run record export/train.py writes: {exc!r}") from exc
        experiment_id = self.experiment_id()
        existing = self.find_run(run_dir.name)
        if existing is not None:
            return LoggedRun(existing, experiment_id, created=False)
        run = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags)
        run_id = run.info.run_id
        try:
            timestamp = run.info.start_time
            metrics = [Metric(key, value, timestamp, 0) for key, value in metric_values.items()]
            metrics += [Metric("train.loss", float(h["loss"]), timestamp, int(h["epoch"])) for h in record.get("history", [])]
            params = [Param(key, value) for key, value in param_values.items()]
            for chunk in _chunks(params, MAX_PARAMS_PER_BATCH):
                self.client.log_batch(run_id, params=chunk)
            for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
                self.client.log_batch(run_id, metrics=chunk)
            for name in RUN_ARTIFACTS:
                self.client.log_artifact(run_id, str(run_dir / name), artifact_path=RUN_ARTIFACT_DIR)
        except Exception:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        self.client.set_terminated(run_id, status="FINISHED")
        return LoggedRun(run_id, experiment_id, created=True)

    def publisher(self, run_id: str) -> Callable[[str, int, dict[str, bytes]], str]:
        """`export_run`'s `publish`: uploads a version's files to the run and returns its metadata's URI."""
        from vitrine.contracts import ranker

        def publish(model: str, version: int, files: dict[str, bytes]) -> str:
            self._log_contents(run_id, triton_artifact_dir(model, version), files)
            return metadata_uri(run_id, model, version, ranker.METADATA_FILE)

        return publish

    def tag_run(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def _log_contents(self, run_id: str, artifact_dir: str, files: dict[str, bytes]) -> None:
        """Log in-memory files (name → content) as the run's artifacts under `artifact_dir` (MLflow logs paths)."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="vitrine-artifacts-") as folder:
            for file_name, content in files.items():
                (Path(folder) / file_name).write_bytes(content)
                self.client.log_artifact(run_id, str(Path(folder) / file_name), artifact_path=artifact_dir)

    def log_card(self, name: str, version: str, files: dict[str, bytes]) -> str:
        """Log a registered version's model card files to its run (`card/<model>/<triton version>/`), tag the version
        with their URI and say so in its description (shown on the registry page); returns the URI."""
        found = self.client.get_model_version(name, version)
        if not found.run_id:
            raise RegistryError(f"version {version} of {name!r} has no run to log its card to")
        artifact_dir = card_artifact_dir(found.tags.get(VERSION_TAG_TRITON_MODEL, name), found.tags.get(VERSION_TAG_TRITON_VERSION, version))
        self._log_contents(found.run_id, artifact_dir, files)
        uri = f"runs:/{found.run_id}/{artifact_dir}"
        self.client.set_model_version_tag(name, version, VERSION_TAG_CARD_URI, uri)
        note = (f"Model card: run {found.run_id}, artifacts `{artifact_dir}/` (model_card.md, model_card.html); "
                f"`vitrine models card {name} {version}`.")
        description = (found.description or "").split("\n\nModel card:")[0]
        self.client.update_model_version(name, version, description=f"{description}\n\n{note}".strip())
        return uri

    def card(self, name: str, version: str, file_name: str = "model_card.md") -> bytes:
        """A registered version's logged card file; RegistryError when the version has none (registered before cards)."""
        import tempfile

        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_model_version(name, version)
        except MlflowException as exc:
            raise RegistryError(f"no version {version} of registered model {name!r} in {self.tracking_url}") from exc
        uri = found.tags.get(VERSION_TAG_CARD_URI)
        if not uri:
            raise RegistryError(f"{name} version {version} has no model card (registered before cards existed, or its "
                                "card could not be made: see the pipeline run's report)")
        run_id, path = parse_runs_uri(f"{uri}/{file_name}")
        with tempfile.TemporaryDirectory(prefix="vitrine-card-") as folder:
            try:
                local = self.client.download_artifacts(run_id, path, folder)
            except (MlflowException, OSError) as exc:
                raise RegistryError(f"{uri}/{file_name} could not be read from the registry: {exc}") from exc
            return Path(local).read_bytes()

    # registered models ----------------------------------------------------------------------------------
    def register_version(self, model: str, run_id: str, triton_version: int, description: str = "") -> RegisteredVersion:
        """A new registered version of `model` (= the Triton model name) from the run's exported files,
        tagged with the Triton model and version it became."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(model, description=f"Triton model {model!r}: Vitrine ranker")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"runs:/{run_id}/{triton_artifact_dir(model, triton_version)}"
        tags = {VERSION_TAG_TRITON_MODEL: model, VERSION_TAG_TRITON_VERSION: str(triton_version),
                VERSION_TAG_METADATA_URI: metadata_uri(run_id, model, triton_version)}
        version = self.client.create_model_version(model, source=source, run_id=run_id, tags=tags, description=description)
        return RegisteredVersion(model, str(version.version), run_id, triton_version, source)

    def set_alias(self, model: str, alias: str, version: str) -> None:
        if alias == CHAMPION:
            raise RegistryError("`champion` is set by promote(), which also moves the previous champion to `fallback`")
        if alias not in ALIASES:
            raise RegistryError(f"alias {alias!r}: Vitrine uses {', '.join(ALIASES)}")
        self.client.set_registered_model_alias(model, alias, version)

    def by_alias(self, model: str, alias: str) -> ModelVersion | None:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(model, alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise

    def champion(self, model: str) -> ModelVersion | None:
        """The version promoted to serve `model`, or None before any promotion."""
        return self.by_alias(model, CHAMPION)

    def aliases(self, model: str) -> dict[str, str]:
        """alias → registry version of `model` (empty for a model never registered)."""
        from mlflow.exceptions import MlflowException

        try:
            return _aliases(self.client.get_registered_model(model))
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                return {}
            raise

    def triton_version(self, model: str, version: str) -> int:
        """The Triton version a registered version became (its `triton.version` tag)."""
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_model_version(model, version)
        except MlflowException as exc:
            raise RegistryError(f"no version {version} of registered model {model!r} in {self.tracking_url}") from exc
        tag = found.tags.get(VERSION_TAG_TRITON_VERSION, "")
        if not VERSION_NUMBER.fullmatch(tag):
            raise RegistryError(f"{model} version {version} has no Triton version tag ({VERSION_TAG_TRITON_VERSION}={tag!r})")
        return int(tag)

    def aliased_triton_versions(self, model: str) -> dict[str, int]:
        """alias → Triton version for every alias of `model` (champion, challenger, fallback): what `prune` keeps."""
        return {alias: self.triton_version(model, version) for alias, version in self.aliases(model).items()}

    def _apply(self, model: str, moves: dict[str, str]) -> None:
        # `champion` last: stopped half-way, the old champion still serves as champion (and may also carry `fallback`),
        # and promoting the intended version again yields the intended pair (promotion_moves).
        for alias in sorted(moves, key=lambda a: a == CHAMPION):
            self.client.set_registered_model_alias(model, alias, moves[alias])

    def promote(self, model: str, version: str) -> dict[str, str]:
        """The one way a version becomes `champion`: the previous champion becomes `fallback`. Returns the moves."""
        self.triton_version(model, version)  # the version exists and knows its Triton version
        moves = promotion_moves(self.aliases(model), version)
        self._apply(model, moves)
        return moves

    def swap_to_fallback(self, model: str) -> dict[str, str]:
        """`fallback` becomes `champion` and the old champion `fallback` (a promotion of the fallback); RegistryError
        without a fallback."""
        moves = fallback_moves(self.aliases(model))
        self._apply(model, moves)
        return moves

    def models(self) -> list[dict[str, Any]]:
        """Every registered model with its newest version and aliases (for `vitrine models list`)."""
        rows = []
        for model in self.client.search_registered_models(max_results=1000):
            versions = self.client.search_model_versions(f"name = '{_quote(model.name)}'")
            newest = max(versions, key=lambda v: int(v.version), default=None)
            rows.append({
                "name": model.name,
                "versions": len(versions),
                "latest_version": newest.version if newest else None,
                "latest_triton_version": newest.tags.get(VERSION_TAG_TRITON_VERSION) if newest else None,
                "aliases": dict(sorted((alias, str(version)) for alias, version in _aliases(model).items())),
            })
        return sorted(rows, key=lambda row: row["name"])

    def versions(self, model: str) -> list[dict[str, Any]]:
        """Every version of `model`, newest first, with its run's headline metrics (for `vitrine models show`)."""
        if not self.client.search_registered_models(filter_string=f"name = '{_quote(model)}'"):
            raise RegistryError(f"no registered model {model!r} in {self.tracking_url}")
        aliases = _aliases(self.client.get_registered_model(model))
        by_version: dict[str, list[str]] = {}
        for alias, version in aliases.items():
            by_version.setdefault(str(version), []).append(alias)
        rows = []
        for version in sorted(self.client.search_model_versions(f"name = '{_quote(model)}'"), key=lambda v: -int(v.version)):
            rows.append(self._version_row(version, sorted(by_version.get(str(version.version), []))))
        return rows

    def version(self, model: str, version: str) -> dict[str, Any]:
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_model_version(model, version)
        except MlflowException as exc:
            raise RegistryError(f"no version {version} of registered model {model!r} in {self.tracking_url}") from exc
        aliases = [a for a, v in _aliases(self.client.get_registered_model(model)).items() if str(v) == str(version)]
        row = self._version_row(found, sorted(aliases))
        run = self.client.get_run(found.run_id) if found.run_id else None
        if run is not None:
            row["params"] = dict(sorted(run.data.params.items()))
            row["metrics"] = dict(sorted(run.data.metrics.items()))
            row["run_tags"] = {k: v for k, v in sorted(run.data.tags.items()) if not k.startswith("mlflow.") or k == TAG_GIT_COMMIT}
        return row

    def _version_row(self, version: ModelVersion, aliases: list[str]) -> dict[str, Any]:
        metrics: dict[str, float] = {}
        if version.run_id:
            metrics = self.client.get_run(version.run_id).data.metrics
        return {
            "name": version.name,
            "version": str(version.version),
            "aliases": aliases,
            "triton_model": version.tags.get(VERSION_TAG_TRITON_MODEL),
            "triton_version": version.tags.get(VERSION_TAG_TRITON_VERSION),
            "run_id": version.run_id,
            "source": version.source,
            "created_ms": version.creation_timestamp,
            "recall_10": metrics.get("model.recall_10"),
            "tags": dict(sorted(version.tags.items())),
        }


def _aliases(model: Any) -> dict[str, str]:  # noqa: ANN401 - mlflow's RegisteredModel
    aliases = getattr(model, "aliases", {}) or {}
    return {str(alias): str(version) for alias, version in dict(aliases).items()}


def _quote(value: str) -> str:
    """A value inside an MLflow filter string's single quotes."""
    if "'" in value or "\\" in value:
        raise RegistryError(f"{value!r}: quotes and backslashes are not allowed in registry names")
    return value
