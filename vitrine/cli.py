"""The `vitrine` command line. Sub-commands stay thin: they parse, build `Settings`, and call a service."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from vitrine.settings import Settings

app = typer.Typer(help="Vitrine: real-time recommendations on Kafka, Redis and Triton.", no_args_is_help=True)
stack_app = typer.Typer(help="The local stack: Redis, Kafka, MLflow, Triton, the services, Alertmanager, Prometheus under supervisord.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")


def _quiet_client_logs() -> None:
    """aiokafka logs every refused connection at ERROR; while the stack starts those are expected."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        # Field and message only: pydantic's own text repeats the input value, which may be a secret.
        lines = [f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors(include_input=False, include_url=False)]
        typer.secho("invalid configuration:\n" + "\n".join(lines), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except (FileNotFoundError, ValueError) as exc:
        typer.secho(f"invalid configuration:\n{exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc


def _stack():  # noqa: ANN202 - imported lazily so that `vitrine --help` stays fast
    from vitrine.services.stack import Stack

    _quiet_client_logs()
    return Stack(_settings())


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(1)


def _print_status(statuses) -> bool:  # noqa: ANN001
    width = max(len(s.name) for s in statuses)
    for s in statuses:
        mark = typer.style("healthy", fg=typer.colors.GREEN) if s.healthy else typer.style("unhealthy", fg=typer.colors.RED)
        pid = f"pid {s.pid}" if s.pid else "-"
        detail = "" if s.healthy else f"  ({s.detail})"
        typer.echo(f"{s.name:<{width}}  {s.state:<8} {pid:<10} {mark}  {s.url}{detail}")
    return all(s.healthy for s in statuses)


@stack_app.command("up")
def stack_up() -> None:
    """Start the stack in order, each component health-checked; a no-op for what already runs."""
    from vitrine.services.stack import StackError
    from vitrine.services.stack.components import SetupMissing

    stack = _stack()
    try:
        statuses = asyncio.run(stack.up(report=typer.echo))
    except (StackError, SetupMissing) as exc:
        raise _fail(exc) from exc
    typer.echo("")
    if not _print_status(statuses):
        raise typer.Exit(1)
    typer.echo(f"\nlogs: {stack.supervisor.logs}/<component>.log — `vitrine stack logs <component>`")


@stack_app.command("down")
def stack_down() -> None:
    """Stop every component and the supervisor; nothing of the stack keeps running."""
    asyncio.run(_stack().down(report=typer.echo))


@stack_app.command("status")
def stack_status() -> None:
    """Each component with its process state and health; exits 1 unless all are healthy."""
    if not _print_status(asyncio.run(_stack().status())):
        raise typer.Exit(1)


@stack_app.command("logs")
def stack_logs(
    component: Annotated[str, typer.Argument(help="redis, redis-exporter, kafka, mlflow, triton, features, outcomes, archive, gateway, rollouts, triggers, alertmanager, prometheus or supervisord")],
    lines: Annotated[int, typer.Option("--lines", "-n", min=1, max=100_000, help="How many lines from the end.")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
) -> None:
    """Print the end of one component's log."""
    try:
        path = _stack().log_path(component)
    except ValueError as exc:
        raise _fail(exc) from exc
    if not path.exists():
        raise _fail(FileNotFoundError(f"no log yet at {path}"))
    command = ["tail", "-n", str(lines)] + (["-F"] if follow else []) + [str(path)]
    raise typer.Exit(subprocess.call(command, stdout=sys.stdout))


events_app = typer.Typer(help="Storefront events: generate (and later publish) them.", no_args_is_help=True)
app.add_typer(events_app, name="events")


def _load_events(preset: str | None, events: Path | None, movielens: Path | None, seed: int, drift_at_day: float | None,
                 archive: Path | None = None, since: datetime | None = None, until: datetime | None = None,
                 interactions_file: Path | None = None):
    """One of: a synthetic preset, a JSONL file of events, a MovieLens ratings file, a plain interaction log (CSV),
    the event archive (a date range)."""
    from vitrine.export.data import interactions
    from vitrine.export.data import movielens as ml
    from vitrine.export.data import synthetic
    from vitrine.export.data.table import EventTable

    chosen = [name for name, value in (("--preset", preset), ("--events", events), ("--movielens", movielens), ("--archive", archive),
                                       ("--interactions", interactions_file)) if value]
    if len(chosen) > 1:
        raise typer.BadParameter(f"choose one data source, not {' and '.join(chosen)}")
    if archive is None and (since or until):
        raise typer.BadParameter("--since and --until choose dates of the archive: use them with --archive")
    if since and until and since > until:
        raise typer.BadParameter(f"--since {since.date()} is after --until {until.date()}")
    try:
        if archive:
            from vitrine.export.data.archive import load as load_archive

            table = load_archive(archive, since and since.date(), until and until.date(), _settings().archive.events_topic)
            if not len(table):
                raise ValueError(f"the archive at {archive} has no events between {since and since.date() or 'the start'} "
                                 f"and {until and until.date() or 'the end'}")
            return table, {"source": f"archive:{archive}", "since": since and since.date().isoformat(),
                           "until": until and until.date().isoformat()}
        if events:
            return EventTable.read_jsonl(events), {"source": f"events:{events.name}"}
        if movielens:
            return ml.load(movielens), {"source": f"movielens:{movielens.name}"}
        if interactions_file:
            return interactions.load(interactions_file), {"source": f"interactions:{interactions_file.name}"}
        name = preset or "default"
        config = synthetic.preset(name, seed=seed)
        if drift_at_day is not None:
            config = synthetic.preset(name, seed=seed, drift_at_ms=config.start_ms + int(drift_at_day * synthetic.DAY_MS))
        return synthetic.generate(config), {"source": f"synthetic:{name}", "seed": seed, "drift_at_day": drift_at_day}
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc)) from exc


PresetOption = Annotated[str | None, typer.Option(help="Synthetic storefront size: tiny, small, default, wide (~9k items), large, huge.")]
EventsOption = Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="JSONL file of events.")]
MovieLensOption = Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="MovieLens ratings.csv or u.data.")]
InteractionsOption = Annotated[Path | None, typer.Option(
    "--interactions", exists=True, dir_okay=False,
    help="CSV interaction log with columns user_id,item_id,timestamp[,seq_pos,type] (e.g. the Amazon 5-core benchmark).")]
SeedOption = Annotated[int, typer.Option(min=0, help="Seed of the synthetic data and of training.")]
DriftOption = Annotated[float | None, typer.Option(min=0, help="Synthetic only: a new item line takes off from this day.")]
ArchiveOption = Annotated[Path | None, typer.Option(exists=True, file_okay=False, help="Event archive folder (`vitrine archive run`'s root).")]
DateOption = Annotated[datetime | None, typer.Option(formats=["%Y-%m-%d"], help="With --archive: first (--since) or last (--until) UTC date, inclusive.")]


RateOption = Annotated[float | None, typer.Option(min=0.001, max=10_000_000, help="Events per second (default: as fast as possible).")]
CountOption = Annotated[int | None, typer.Option(min=1, help="Stop after this many events.")]
DurationOption = Annotated[float | None, typer.Option(min=0.001, help="Stop after this many seconds.")]
TopicOption = Annotated[str | None, typer.Option(help="Kafka topic (default: settings.features.events_topic).")]


def _publish(events, settings: Settings, topic: str | None, rate: float | None, count: int | None,  # noqa: ANN001
             duration: float | None, retime: bool) -> None:
    from vitrine.services.events.publisher import publish

    _quiet_client_logs()
    try:
        report = asyncio.run(publish(events, settings.kafka.bootstrap_servers, topic or settings.features.events_topic,
                                     rate=rate, limit=count, duration_s=duration, retime=retime))
    except Exception as exc:  # noqa: BLE001 - e.g. Kafka unreachable: one clear line, exit 1
        raise _fail(RuntimeError(f"publishing failed ({type(exc).__name__}: {exc}); is the stack up?")) from exc
    held = "" if report.target_rate is None or report.max_behind_s < 0.05 else f"; fell behind schedule by up to {report.max_behind_s:.2f}s"
    typer.echo(f"published {report.sent} events in {report.seconds:.1f}s ({report.achieved_rate:,.0f}/s){held}")


@events_app.command("generate")
def events_generate(
    out: Annotated[Path | None, typer.Option(dir_okay=False, help="Write JSON lines to this file instead of publishing.")] = None,
    preset: PresetOption = "small",
    seed: SeedOption = 7,
    drift_at_day: DriftOption = None,
    rate: RateOption = None,
    count: CountOption = None,
    duration: DurationOption = None,
    topic: TopicOption = None,
) -> None:
    """Synthetic storefront events: publish to Kafka at a rate (timestamped at send time), or write JSONL."""
    table, _ = _load_events(preset, None, None, seed, drift_at_day)
    if out is not None:
        if count is not None:
            table = table.take(slice(0, count))  # type: ignore[arg-type]
        table.write_jsonl(out)
        typer.echo(f"wrote {len(table)} events to {out}")
        return
    _publish(table.events(), _settings(), topic, rate, count, duration, retime=True)


@events_app.command("replay")
def events_replay(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL file of events.")],
    rate: RateOption = None,
    count: CountOption = None,
    duration: DurationOption = None,
    topic: TopicOption = None,
    keep_timestamps: Annotated[bool, typer.Option(help="Send the file's ts_ms instead of the send time.")] = False,
) -> None:
    """Publish a JSONL file of events (validated line by line) to Kafka at a rate."""
    from vitrine.export.data.table import EventTable

    try:
        table = EventTable.read_jsonl(file)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="FILE") from exc
    _publish(table.events(), _settings(), topic, rate, count, duration, retime=not keep_timestamps)


features_app = typer.Typer(help="The streaming feature consumer.", no_args_is_help=True)
app.add_typer(features_app, name="features")


@features_app.command("run")
def features_run() -> None:
    """Consume storefront events into real-time features in Redis until SIGTERM (settings: VITRINE_FEATURES__*)."""
    from vitrine.services.features.consumer import main

    main(_settings())


from vitrine.commands.outcomes import app as outcomes_app  # noqa: E402 - after the helpers it uses
app.add_typer(outcomes_app, name="outcomes")
from vitrine.commands.archive import app as archive_app  # noqa: E402
app.add_typer(archive_app, name="archive")
from vitrine.commands.data import app as data_app  # noqa: E402 - `vitrine data stats|sample|query` (the archive, by DuckDB)
app.add_typer(data_app, name="data")
from vitrine.commands.models import app as models_app  # noqa: E402
app.add_typer(models_app, name="models")
from vitrine.commands.pipeline import app as pipeline_app  # noqa: E402 - `vitrine pipeline run|resume|status|list|reproduce`
app.add_typer(pipeline_app, name="pipeline")
from vitrine.commands.triggers import app as triggers_app  # noqa: E402 - `vitrine triggers run` (webhook → pipeline)
app.add_typer(triggers_app, name="triggers")
from vitrine.commands.rollout import app as rollout_app  # noqa: E402 - `vitrine rollout start|status|pause|resume|abort`
from vitrine.commands.rollout import service_app as rollouts_app  # noqa: E402 - `vitrine rollouts run` (the controller)
app.add_typer(rollout_app, name="rollout")
app.add_typer(rollouts_app, name="rollouts")


@app.command("train")
def train_command(
    model: Annotated[list[str], typer.Option("--model", "-m", help="gru4rec and/or sasrec (repeatable).")] = ["gru4rec", "sasrec"],  # noqa: B006
    preset: PresetOption = None,
    events: EventsOption = None,
    movielens: MovieLensOption = None,
    interactions_file: InteractionsOption = None,
    archive: ArchiveOption = None,
    since: DateOption = None,
    until: DateOption = None,
    seed: SeedOption = 7,
    drift_at_day: DriftOption = None,
    # The defaults are TrainConfig's (tests/unit/test_cli.py checks it; importing torch here would slow every command).
    epochs: Annotated[int | None, typer.Option(min=1, max=1000, help="Default: per architecture (gru4rec 10, sasrec 7).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, max=65536, help="Default: per architecture (gru4rec 64, sasrec 32).")] = None,
    learning_rate: Annotated[float | None, typer.Option(min=1e-6, max=1.0, help="Peak rate; default: per architecture (gru4rec 8e-3, sasrec 5e-3).")] = None,
    dim: Annotated[int | None, typer.Option(min=4, max=1024, help="Embedding size; default: per architecture (gru4rec 64, sasrec 128).")] = None,
    max_len: Annotated[int, typer.Option(min=2, max=512, help="History steps the model sees.")] = 20,
    validation_fraction: Annotated[float, typer.Option(min=0.01, max=0.5)] = 0.1,
    loss: Annotated[str, typer.Option(help="Training loss: full (softmax over the catalogue) or sampled (target vs. shared sampled negatives, logQ-corrected). Evaluation always ranks the full catalogue.")] = "full",
    negatives: Annotated[int, typer.Option(min=1, max=100_000, help="Sampled loss: negatives per batch.")] = 512,
    sampling_alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Sampled loss: negatives drawn ∝ popularity ** alpha (0 = uniform).")] = 0.0,
    threads: Annotated[int, typer.Option(min=1, max=64, help="Torch threads; on a machine shared with other heavy work 1 can be several times faster than 2.")] = 2,
    tied: Annotated[bool, typer.Option("--tied/--untied", help="Score items with their input embeddings (tied) or an output table of their own (untied, the default).")] = False,
    dropout: Annotated[float | None, typer.Option(min=0.0, max=0.9, help="Dropout; default: per architecture (gru4rec 0.1 on the embeddings, sasrec 0.05).")] = None,
    item_dropout: Annotated[float, typer.Option(min=0.0, max=0.9, help="Training only: share of input steps whose item id is replaced by the unknown item.")] = 0.0,
    weight_decay: Annotated[float, typer.Option(min=0.0, max=1.0, help="Adam weight decay.")] = 0.0,
    adam_beta2: Annotated[float, typer.Option(min=0.5, max=0.9999, help="Adam's second-moment decay.")] = 0.999,
    loss_share: Annotated[float, typer.Option(min=0.01, max=1.0, help="Training only: share of each batch's real positions the loss scores (the catalogue softmax costs in proportion).")] = 1.0,
    lr_schedule: Annotated[str, typer.Option(help="Learning rate over the run: constant, or cosine (decays to 0 by the last step).")] = "cosine",
    warmup: Annotated[float, typer.Option(min=0.0, max=0.99, help="Share of the training steps over which the learning rate ramps up linearly.")] = 0.05,
    patience: Annotated[int, typer.Option(min=0, max=1000, help="Early stopping: stop after this many epochs without a better validation Recall@10 and keep the best epoch (0: train every epoch).")] = 0,
    out: Annotated[Path, typer.Option(file_okay=False, help="Where run folders go.")] = Path("runs"),
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    registry: Annotated[bool | None, typer.Option(
        "--registry/--no-registry",
        help="Log each run to the model registry (settings `registry`). Default: when it answers; --registry: "
             "an unreachable registry is an error (checked before training); --no-registry: never.")] = None,
) -> None:
    """Train next-item models on events and record each run (parameters, data fingerprint, metrics), also in the registry."""
    from vitrine.export.data import sequences
    from vitrine.export.models import ARCHITECTURES
    from vitrine.export.train import SCHEDULES, TrainConfig, train

    if loss not in ("full", "sampled"):
        raise typer.BadParameter("choose full or sampled", param_hint="--loss")
    if lr_schedule not in SCHEDULES:
        raise typer.BadParameter(f"choose {' or '.join(SCHEDULES)}", param_hint="--lr-schedule")
    unknown = [m for m in model if m not in ARCHITECTURES]
    if unknown:
        raise typer.BadParameter(f"unknown model {unknown[0]!r}; choose from {', '.join(ARCHITECTURES)}", param_hint="--model")
    tracker = _training_registry(registry)
    table, info = _load_events(preset, events, movielens, seed, drift_at_day, archive, since, until, interactions_file)
    try:
        dataset = sequences.build(table, max_len=max_len, validation_fraction=validation_fraction, seed=seed)
    except ValueError as exc:
        raise _fail(exc) from exc
    info = {**info, "fingerprint": table.fingerprint(), "events": len(table),
            "users": int(len(set(table.user_id.tolist()))), "items": int(len(set(table.item_id.tolist())))}
    typer.echo(f"data: {info['events']} events, {len(dataset.train_inputs)} training windows, "
               f"{len(dataset.valid_targets)} validation targets, fingerprint {info['fingerprint'][:12]}")
    for architecture in model:
        config = TrainConfig(architecture=architecture, epochs=epochs, batch_size=batch_size,  # type: ignore[arg-type]
                             learning_rate=learning_rate, dim=dim, max_len=max_len, seed=seed,
                             loss=loss, negatives=negatives, sampling_alpha=sampling_alpha, threads=threads, tied=tied,  # type: ignore[arg-type]
                             dropout=dropout, item_dropout=item_dropout, weight_decay=weight_decay, patience=patience,
                             adam_beta2=adam_beta2, loss_share=loss_share, lr_schedule=lr_schedule, warmup=warmup)  # type: ignore[arg-type]
        run_dir = train(config, dataset, info, out, progress=progress)
        record = json.loads((run_dir / "run.json").read_text())
        kept = f", kept epoch {record['best_epoch']} of {len(record['history'])}" if patience else ""
        typer.echo(_metrics_table(record) + f"\n{architecture}: trained in {record['duration_s']:.0f}s{kept} → {run_dir}")
        if tracker is not None:
            logged = tracker.log_training_run(run_dir, source="vitrine train")
            typer.echo(f"{architecture}: logged to the registry as run {logged.run_id} "
                       f"({tracker.tracking_url}/#/experiments/{logged.experiment_id}/runs/{logged.run_id})")


def _training_registry(wanted: bool | None):  # noqa: ANN202 - export.registry.Registry | None
    """The registry `vitrine train` logs to: None with --no-registry, or by default when it does not answer."""
    from vitrine.commands.models import RegistryMissing, connect

    if wanted is False:
        return None
    try:
        return connect(_settings(), "runs are logged there")
    except RegistryMissing as exc:
        if wanted:
            raise _fail(exc) from exc
        typer.secho(f"note: {exc}; training without it (`vitrine export` logs the run later; --no-registry hides this note)",
                    fg=typer.colors.YELLOW, err=True)
        return None


def _metrics_table(record: dict) -> str:
    """The model and every baseline, one row each, the strongest baseline marked (by its metric)."""
    section = record["baselines"]
    names = ["model", *section["metrics"]]
    metric_names = list(record["metrics"]["model"])
    rows = [[record["model"] if name == "model" else name, *(f"{record['metrics'][name][k]:.4f}" for k in metric_names),
             "← strongest baseline" if name == section["strongest"] else ""] for name in names]
    rows.insert(0, ["", *metric_names, f"(strongest by {section['metric']})"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _model_name(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", value):
        raise typer.BadParameter("use lower-case letters, digits and _ (a Triton model folder name), at most 64")
    return value


def _protected_versions(settings: Settings, tracker, model: str) -> frozenset[int]:  # noqa: ANN001 - Registry | None
    """Versions pruning keeps whatever their age: the registry's aliases and the experiment's pins (export/aliases.py).
    With the experiment store away nothing is pruned this time (said so): a pinned version is never guessed away."""
    from vitrine.export.aliases import FallbackError, experiment_pins, registry_protected
    from vitrine.export.triton_repository import versions

    protected = registry_protected(tracker, model) if tracker is not None else set()
    try:
        protected |= asyncio.run(experiment_pins(settings, model))
    except FallbackError as exc:
        typer.secho(f"{exc}: no version of {model} is pruned this time", fg=typer.colors.YELLOW)
        protected |= set(versions(settings.triton.model_repository / model))
    return frozenset(protected)


@app.command("export")
def export_command(
    runs: Annotated[list[Path] | None, typer.Argument(help="Run folders; default: the newest run of each model in --runs-dir.")] = None,
    runs_dir: Annotated[Path, typer.Option(file_okay=False)] = Path("runs"),
    name: Annotated[str | None, typer.Option(help="Model name in the repository (default: the architecture).", callback=_model_name)] = None,
    max_k: Annotated[int, typer.Option(min=1, max=1000, help="Items returned by the graph's top-k.")] = 50,
    keep: Annotated[int, typer.Option(min=1, max=100, help="Versions kept on disk and served.")] = 3,
    load: Annotated[bool, typer.Option(help="Load into the running Triton and verify it serves the new version.")] = True,
    gate: Annotated[bool, typer.Option(help="Export only runs that beat the strongest baseline by the margin, the served "
                                            "champion (same data) and lose no slice (settings `gate`, export/gate.py).")] = True,
    gate_metric: Annotated[str | None, typer.Option(help="The gate's metric (default: settings gate.metric, recall@10).")] = None,
    margin: Annotated[float | None, typer.Option(min=0.0, max=0.999, help="Relative margin over the strongest baseline "
                                                 "(default: settings gate.margin, 0.02).")] = None,
    champion_tolerance: Annotated[float | None, typer.Option(min=0.0, max=0.999, help="Relative tolerance below the champion "
                                                             "(default: settings gate.champion_tolerance, 0.01).")] = None,
    slice_tolerance: Annotated[float | None, typer.Option(min=0.0, max=0.999, help="Relative tolerance per slice "
                                                          "(default: settings gate.slice_tolerance, 0.05).")] = None,
    registry: Annotated[bool, typer.Option(
        "--registry/--no-registry",
        help="Register each exported version in the model registry (alias challenger) and put its metadata's registry "
             "URI into the Triton config; an unreachable registry is an error before anything is written. "
             "--no-registry: the gateway then reads the version's metadata from the local model repository "
             "(local stack only).")] = True,
) -> None:
    """Export runs to ONNX (parity-checked) as new versions in the Triton model repository, registered in MLflow."""
    from pydantic import ValidationError

    from vitrine.export.gate import GateError, GatePolicy, champion_record, gate_run
    from vitrine.export.registry import RegistryError
    from vitrine.settings import GateSettings
    from vitrine.export.onnx_export import ParityError, export_run
    from vitrine.export.serving_check import ServingMismatch, load_and_verify
    from vitrine.export.validate import ModelFolderError

    settings = _settings()
    flags = {"metric": gate_metric, "margin": margin, "champion_tolerance": champion_tolerance, "slice_tolerance": slice_tolerance}
    try:
        policy = GatePolicy.from_settings(GateSettings.model_validate(
            {**settings.gate.model_dump(), **{k: v for k, v in flags.items() if v is not None}}))
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from exc
    chosen = runs or _newest_runs(runs_dir)
    if not chosen:
        raise _fail(FileNotFoundError(f"no run folders in {runs_dir}; run `vitrine train` first"))
    tracker = None  # connected when the first run passes the gate: a rejection needs no registry
    rejected = []
    for run_dir in chosen:
        if gate:
            try:
                record = json.loads((run_dir / "run.json").read_text())
                folder = settings.triton.model_repository / (name or record["model"])
                champion, about_champion = champion_record(folder, record)
                decision = gate_run(record, champion, policy)
            except (GateError, FileNotFoundError, KeyError) as exc:
                raise _fail(exc) from exc
            verdict = "accepted" if decision.accepted else "REJECTED"
            typer.echo(f"{run_dir.name}: gate {verdict} (champion: {about_champion})\n{decision.format()}")
            if not decision.accepted:
                typer.secho("\n".join(f"  {reason}" for reason in decision.reasons), fg=typer.colors.RED, err=True)
                rejected.append(run_dir.name)
                continue
        if registry and tracker is None:
            from vitrine.commands.models import RegistryMissing, connect

            try:  # before anything is written
                tracker = connect(settings, "exported versions are registered there (or pass --no-registry)")
            except RegistryMissing as exc:
                raise _fail(exc) from exc
        try:
            logged = tracker.log_training_run(run_dir, source="vitrine export") if tracker is not None else None
        except (FileNotFoundError, RegistryError) as exc:
            raise _fail(exc) from exc
        publish = tracker.publisher(logged.run_id) if tracker is not None and logged is not None else None
        try:
            model_name = name or json.loads((run_dir / "run.json").read_text())["model"]
            protected = _protected_versions(settings, tracker, model_name)
            result = export_run(run_dir, settings.triton.model_repository, name=name, max_k=max_k, keep_versions=keep,
                                publish=publish, protected=protected)
        except (ParityError, ModelFolderError, FileNotFoundError) as exc:
            raise _fail(exc) from exc
        typer.echo(f"{result.model} v{result.version}: parity ok (max |Δscore| {result.max_abs_score_diff:.1e}) → {result.folder}"
                   + (f"; removed v{', v'.join(map(str, result.removed_versions))}" if result.removed_versions else ""))
        if load:
            try:
                asyncio.run(load_and_verify(settings.triton.grpc_url, result.model, result.folder))
            except ServingMismatch as exc:
                raise _fail(exc) from exc
            except Exception as exc:  # noqa: BLE001 - Triton unreachable: the export itself stands
                typer.secho(f"{result.model} v{result.version}: not loaded ({type(exc).__name__}: {exc}); "
                            "it is served at the next `vitrine stack up`", fg=typer.colors.YELLOW)
            else:
                typer.echo(f"{result.model} v{result.version}: served by Triton, top-k equal to onnxruntime in-process")
        if tracker is not None and logged is not None:
            from vitrine.export.registry import CHALLENGER

            registered = tracker.register_version(result.model, logged.run_id, result.version,
                                                  description=f"exported from {run_dir.name}")
            tracker.set_alias(result.model, CHALLENGER, registered.version)
            typer.echo(f"{result.model} v{result.version}: registered as {result.model} version {registered.version} "
                       f"(alias {CHALLENGER}) in {tracker.tracking_url}")
            from vitrine.export import model_card

            try:  # the card documents the registered version; failing to make it does not undo the export
                model_card.log_to_registry(tracker, run_dir, result.folder, {
                    "name": result.model, "version": registered.version, "alias": CHALLENGER,
                    "triton_version": result.version, "run_id": logged.run_id})
            except Exception as exc:  # noqa: BLE001
                typer.secho(f"{result.model} version {registered.version}: no model card ({exc!r})", fg=typer.colors.YELLOW)
            else:
                typer.echo(f"{result.model} version {registered.version}: model card logged "
                           f"(`vitrine models card {result.model} {registered.version}`)")
    if rejected:
        typer.secho(f"not exported (rejected by the gate): {', '.join(rejected)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


gateway_app = typer.Typer(help="The gRPC gateway storefronts call.", no_args_is_help=True)
app.add_typer(gateway_app, name="gateway")
ab_app = typer.Typer(help="The A/B experiment: show or change the traffic split at runtime.", no_args_is_help=True)
app.add_typer(ab_app, name="ab")
KeyOption = Annotated[str | None, typer.Option("--key", envvar="VITRINE_API_KEY", help="API key (env VITRINE_API_KEY).")]


@gateway_app.command("run")
def gateway_run() -> None:
    """Serve Recommend and ExperimentAdmin until SIGTERM (settings: VITRINE_GATEWAY__*)."""
    from vitrine.services.gateway.server import main

    main(_settings())


def _client(key: str | None):  # noqa: ANN202
    from vitrine.services.gateway.client import GatewayClient

    settings = _settings()
    root = settings.gateway.tls_cert.read_bytes() if settings.gateway.tls_cert else None
    return GatewayClient(settings.gateway.address, key, root)


def _rpc(call):  # noqa: ANN001, ANN202
    import grpc

    async def run():  # noqa: ANN202
        return await call()

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        raise _fail(RuntimeError(f"{exc.code().name}: {exc.details()}")) from exc


def _show_experiment(experiment) -> None:  # noqa: ANN001
    typer.echo(f"experiment {experiment.name!r} revision {experiment.revision} (salt {experiment.salt!r}, "
               f"mode {experiment.mode or 'ab'}), set by {experiment.updated_by or '-'}")
    for v in experiment.variants:
        typer.echo(f"  {v.name:<16} {v.weight:>3}%  {v.model_name}:{v.model_version or 'newest'}")


@ab_app.command("show")
def ab_show(key: KeyOption = None) -> None:
    """The current split, as the gateway serves it."""
    async def call():  # noqa: ANN202
        async with _client(key) as client:
            return await client.get_experiment()

    _show_experiment(_rpc(call))


def _parse_variant(text: str) -> tuple[str, str, str, int]:
    match = re.fullmatch(r"([a-z0-9_-]{1,32})=([a-z][a-z0-9_]{0,63})(?::([0-9]{1,10}))?=([0-9]{1,3})", text)
    if not match:
        raise typer.BadParameter(f"{text!r} is not NAME=MODEL[:VERSION]=WEIGHT (e.g. control=gru4rec=70)", param_hint="--variant")
    name, model, version, weight = match.groups()
    return name, model, version or "", int(weight)


@ab_app.command("set")
def ab_set(
    variant: Annotated[list[str], typer.Option("--variant", "-v", help="NAME=MODEL[:VERSION]=WEIGHT, repeatable; weights sum to 100.")],
    salt: Annotated[str | None, typer.Option(help="New assignment salt (reshuffles every user); default: keep.")] = None,
    expected_revision: Annotated[int, typer.Option(min=0, help="Fail if the experiment is not at this revision (0: no check).")] = 0,
    mode: Annotated[str, typer.Option(help="ab: one variant per user by weight; interleave: two variants merged in every answer.")] = "ab",
    key: KeyOption = None,
) -> None:
    """Change the split; validated (weights, models ready) and audited by the gateway."""
    if mode not in ("ab", "interleave"):
        raise typer.BadParameter(f"{mode!r} is not ab or interleave", param_hint="--mode")
    if mode == "interleave" and len(variant) != 2:
        raise typer.BadParameter("interleaving compares exactly two variants", param_hint="--variant")
    from vitrine.v1 import recommender_pb2 as pb

    parsed = [_parse_variant(v) for v in variant]
    if sum(w for *_, w in parsed) != 100:
        raise typer.BadParameter(f"weights sum to {sum(w for *_, w in parsed)}, not 100", param_hint="--variant")

    async def call():  # noqa: ANN202
        async with _client(key) as client:
            current = await client.get_experiment()
            experiment = pb.Experiment(name=current.name, salt=salt or current.salt, mode=mode, variants=[
                pb.Variant(name=n, model_name=m, model_version=ver, weight=w) for n, m, ver, w in parsed])
            return await client.set_experiment(experiment, expected_revision)

    _show_experiment(_rpc(call))


from vitrine.commands.ab_report import ab_report  # noqa: E402 - `vitrine ab report`

ab_app.command("report")(ab_report)


@app.command("recommend")
def recommend(
    user: Annotated[str, typer.Argument(help="User id.")],
    k: Annotated[int, typer.Option(min=1, max=1000)] = 10,
    page: Annotated[str, typer.Option()] = "",
    item: Annotated[str, typer.Option(help="The item the user is looking at.")] = "",
    key: KeyOption = None,
    explain: Annotated[bool, typer.Option("--explain", help="Also show, per item, the history item that led to it.")] = False,
) -> None:
    """Ask the gateway for recommendations, as a storefront would."""
    async def call():  # noqa: ANN202
        async with _client(key) as client:
            return await client.recommend(user, k, page=page, item_id=item, explain=explain)

    reply = _rpc(call)
    flag = f"DEGRADED ({reply.degraded_reason})" if reply.degraded else "ok"
    typer.echo(f"{user}: variant {reply.variant}, {reply.model_name}:{reply.model_version or '-'}, {flag}")
    if not explain:
        typer.echo("  " + ", ".join(f"{i.item_id} ({i.score:.2f})" for i in reply.items))
        return
    for i in reply.items:
        typer.echo(f"  {i.item_id} ({i.score:.2f})" + (f"  ← {i.explained_by}" if i.explained_by else ""))
    if reply.explanation_unavailable:
        typer.echo(f"  no explanations: {reply.explanation_unavailable}")


bench_app = typer.Typer(help="Benchmarks that print figures (ratios measured in one run); without a sub-command: all.",
                        invoke_without_command=True)
app.add_typer(bench_app, name="bench")
from vitrine.commands.stats import bench_stats  # noqa: E402 - `vitrine bench stats` (statistics by simulation)
bench_app.command("stats")(bench_stats)


@bench_app.callback()
def bench_default(ctx: typer.Context) -> None:
    """`vitrine bench` alone runs every benchmark and prints one table of ratios (as `vitrine bench all`)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(bench_all, out=Path("docs/bench-all.json"))


@bench_app.command("models")
def bench_models(
    model: Annotated[list[str], typer.Option("--model", "-m", help="Models in the repository (repeatable).")] = ["gru4rec", "sasrec"],  # noqa: B006
    calls: Annotated[int, typer.Option(min=10, max=100_000, help="Timed calls per batch size (fewer for big batches).")] = 400,
    warmup: Annotated[int, typer.Option(min=0, max=10_000)] = 30,
    out: Annotated[Path | None, typer.Option(dir_okay=False, help="Also write the raw figures as JSON.")] = None,
) -> None:
    """Latency of onnxruntime in-process vs. Triton (CPU config) per batch size; needs `vitrine stack up`."""
    from vitrine.loadtest.model_latency import run

    settings = _settings()
    for name in model:
        if not (settings.triton.model_repository / name).is_dir():
            raise typer.BadParameter(f"no model {name!r} in {settings.triton.model_repository}", param_hint="--model")
    try:
        typer.echo(run(settings, model, calls, warmup, out))
    except Exception as exc:  # noqa: BLE001 - e.g. Triton not running: say so plainly
        raise _fail(RuntimeError(f"benchmark failed ({type(exc).__name__}: {exc}); is the stack up?")) from exc


@bench_app.command("features")
def bench_features(
    events: Annotated[int, typer.Option(min=1000, max=10_000_000, help="Backlog drained for the throughput figure.")] = 200_000,
    freshness_seconds: Annotated[float, typer.Option(min=1, max=3600, help="Length of the half-rate freshness run.")] = 20,
    freshness_rate: Annotated[float | None, typer.Option(min=1, max=1_000_000, help="Publish at this rate instead of half the measured one.")] = None,
) -> None:
    """Consumer events/s (one process, backlog drained) and freshness p50/p99 at half that rate; needs the stack."""
    from vitrine.loadtest.feature_throughput import render, run

    _quiet_client_logs()
    try:
        result = asyncio.run(run(_settings(), events, freshness_seconds, freshness_rate, report=typer.echo))
    except Exception as exc:  # noqa: BLE001
        raise _fail(RuntimeError(f"benchmark failed ({type(exc).__name__}: {exc}); is the stack up?")) from exc
    typer.echo(render(result))


@bench_app.command("gateway")
def bench_gateway(
    rates: Annotated[str, typer.Option(help="Comma-separated rates (req/s) for gateway vs direct Triton.")] = "50,200",
    duration: Annotated[float, typer.Option(min=1, max=600, help="Seconds measured per run (after warm-up).")] = 8,
    slo_ms: Annotated[float, typer.Option(min=1, max=10_000, help="p99 target for the capacity ramps.")] = 25,
    start_rate: Annotated[float, typer.Option(min=1, max=100_000, help="First rate of each ramp.")] = 100,
    max_rate: Annotated[float, typer.Option(min=1, max=100_000, help="No ramp goes beyond this rate.")] = 20_000,
    repeats: Annotated[int, typer.Option(min=1, max=9, help="Runs per comparison and per ramp step (medians, majority).")] = 3,
    out: Annotated[Path | None, typer.Option(dir_okay=False, help="Also write the raw summary as JSON.")] = None,
) -> None:
    """Gateway vs direct Triton at equal load, and capacity at p99 ≤ SLO with batching on/off and a plain server."""
    from vitrine.loadtest.serving_bench import bench, render

    try:
        rate_list = [float(r) for r in rates.split(",") if r.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"not a comma-separated list of numbers: {rates!r}", param_hint="--rates") from exc
    if not rate_list or any(not 0 < r <= 100_000 for r in rate_list):
        raise typer.BadParameter("rates must lie in (0, 100000]", param_hint="--rates")
    if max_rate < start_rate:
        raise typer.BadParameter("must be at least --start-rate", param_hint="--max-rate")
    _quiet_client_logs()
    try:
        results = asyncio.run(bench(_settings(), rate_list, duration, slo_ms, start_rate, report=typer.echo, repeats=repeats, max_rate=max_rate))
    except Exception as exc:  # noqa: BLE001
        raise _fail(RuntimeError(f"benchmark failed ({type(exc).__name__}: {exc}); is the stack up?")) from exc
    _write_bench_outputs(results, out)
    typer.echo(render(results))


def _write_bench_outputs(gateway: dict, out: Path | None) -> None:
    """JSON of the figures, and beside it a PNG of the 70 %-of-capacity run (latency over time, histogram)."""
    from vitrine.loadtest.gateway_load import write_outputs

    steady = gateway.pop("_at_70_percent_result", None)
    if out is None:
        return
    out.write_text(json.dumps(gateway, indent=2, default=float))
    if steady is not None:
        write_outputs(steady, None, out.with_suffix(".png"))


@bench_app.command("all")
def bench_all(
    out: Annotated[Path | None, typer.Option(dir_okay=False, help="Raw figures of every part as JSON.")] = None,
) -> None:
    """Every benchmark in one run, then one table of ratios (models, features, gateway); ≈ 15 minutes."""
    from vitrine.loadtest.feature_throughput import run as run_features
    from vitrine.loadtest.model_latency import bench_model
    from vitrine.loadtest.serving_bench import bench as run_gateway

    settings = _settings()
    _quiet_client_logs()
    try:
        typer.echo("models …")
        models = bench_model(settings, "gru4rec", calls=400, warmup=50)
        typer.echo("features …")
        features = asyncio.run(run_features(settings, 100_000, 10, report=typer.echo))
        typer.echo("gateway …")
        gateway = asyncio.run(run_gateway(settings, [100.0], 8, 25, 100, report=typer.echo))
    except Exception as exc:  # noqa: BLE001
        raise _fail(RuntimeError(f"benchmark failed ({type(exc).__name__}: {exc}); is the stack up?")) from exc
    by = {(m.batch_size, m.path.startswith("Triton")): m for m in models}
    row = gateway["comparison"][0]
    capacity = {k: v["highest_rate"] for k, v in gateway["capacity"].items()}
    lines = ["| ratio (one run, this machine) | value |", "| --- | ---: |",
             f"| gateway ÷ direct Triton, p50 at {row['rate']:g}/s | {row['p50_ratio']:.2f}× |",
             f"| gateway ÷ direct Triton, p99 at {row['rate']:g}/s | {row['p99_ratio']:.2f}× |",
             f"| highest rate at p99 ≤ 25 ms, micro-batching on ÷ off | {capacity['batching on'] / max(capacity['batching off'], 1e-9):.2f}× ({capacity['batching on']:,.0f} vs {capacity['batching off']:,.0f}/s) |",
             f"| highest rate at p99 ≤ 25 ms, gateway ÷ plain one-request-one-inference server | {capacity['batching on'] / max(capacity['plain baseline'], 1e-9):.2f}× ({capacity['plain baseline']:,.0f}/s) |",
             f"| Triton ÷ onnxruntime in-process, p50, batch 1 | {by[(1, True)].p50_ms / by[(1, False)].p50_ms:.1f}× |",
             f"| Triton ÷ onnxruntime in-process, p50, batch 128 | {by[(128, True)].p50_ms / by[(128, False)].p50_ms:.1f}× |",
             f"| Triton cost per item, batch 1 ÷ batch 128 | {by[(1, True)].per_item_us / by[(128, True)].per_item_us:.0f}× |",
             f"| feature consumer: events/s (backlog) | {features.events_per_s:,.0f} |",
             f"| feature consumer: events per CPU-second (consumer + Redis) | {features.events / max(features.cpu_seconds + features.redis_cpu_seconds, 1e-9):,.0f} |",
             f"| freshness p99 at half that rate | {features.freshness_p99_ms:.1f} ms |"]
    steady = gateway.get("at_70_percent")
    if steady:
        lines.append(f"| at 70 % of the gateway's highest rate: p99 ÷ p50 (aim ≤ 3×), failed requests | "
                     f"{steady['p99_over_p50']:.1f}×, {sum(steady['errors'].values())} |")
    budget = gateway.get("cpu_budget")
    if budget:
        from vitrine.loadtest.cpu_budget import CpuBudget
        from vitrine.loadtest.cpu_budget import render as render_budgets

        lines += ["", f"CPU per request of every process at {budget['rate']:,.0f}/s (why the capacities differ):", "",
                  render_budgets([CpuBudget(**b) for b in budget["by_configuration"]])]
    _write_bench_outputs(gateway, out)
    if out is not None:
        from dataclasses import asdict

        out.write_text(json.dumps({"models": [asdict(m) for m in models], "features": asdict(features), "gateway": gateway}, indent=2, default=float))
    typer.echo("\n".join(lines))


def _newest_runs(runs_dir: Path) -> list[Path]:
    newest: dict[str, Path] = {}
    for run in sorted(p for p in runs_dir.glob("*/run.json")):
        newest[json.loads(run.read_text())["model"]] = run.parent
    return list(newest.values())


@app.command("loadtest")
def loadtest(
    rate: Annotated[float, typer.Option(min=0.1, max=100_000, help="Target requests per second (open loop).")] = 100,
    duration: Annotated[float, typer.Option(min=1, max=3600, help="Measured seconds (after warm-up).")] = 20,
    warmup: Annotated[float, typer.Option(min=0, max=600)] = 3,
    arrivals: Annotated[str, typer.Option(help="constant or poisson")] = "poisson",
    cold_share: Annotated[float, typer.Option(min=0, max=1, help="Share of requests for users without history.")] = 0.1,
    events_rate: Annotated[float | None, typer.Option(min=1, max=1_000_000, help="Also publish events at this rate (features churn).")] = None,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    processes: Annotated[int, typer.Option(min=1, max=64, help="Load processes (the rate is split between them).")] = 1,
    out: Annotated[Path | None, typer.Option(dir_okay=False, help="JSON summary.")] = None,
    png: Annotated[Path | None, typer.Option(dir_okay=False, help="Latency over time and histogram.")] = None,
) -> None:
    """Open-loop gRPC load on the gateway: Zipf users, cold starts, pages; percentiles per variant."""
    from vitrine.loadtest.gateway_load import load, load_in_processes, render, write_outputs

    if arrivals not in ("constant", "poisson"):
        raise typer.BadParameter("choose constant or poisson", param_hint="--arrivals")
    _quiet_client_logs()
    try:
        if processes > 1:
            result = load_in_processes(processes, rate, duration, warmup, arrivals, cold_share, events_rate, seed)
        else:
            result = asyncio.run(load(_settings(), rate, duration, warmup, arrivals, cold_share, events_rate, seed))
    except Exception as exc:  # noqa: BLE001
        raise _fail(RuntimeError(f"load test failed ({type(exc).__name__}: {exc}); is the stack up?")) from exc
    write_outputs(result, out, png)
    typer.echo(render(result))


@app.command("report")
def report(
    out: Annotated[Path, typer.Option(dir_okay=False, help="PNG to write.")] = Path("docs/report.png"),
    minutes: Annotated[float, typer.Option(min=1, max=7 * 24 * 60, help="Time range, ending now.")] = 15,
) -> None:
    """Render the key dashboard panels (same PromQL) from the stack's Prometheus to a PNG."""
    from vitrine.report import render

    settings = _settings()
    try:
        path = render(settings.prometheus.url, out, minutes)
    except Exception as exc:  # noqa: BLE001
        raise _fail(RuntimeError(f"report failed ({type(exc).__name__}: {exc}); is the stack up?")) from exc
    typer.echo(f"wrote {path}")


@app.command("demo")
def demo(
    background_events: Annotated[int, typer.Option(min=0, max=10_000_000, help="Synthetic events published first.")] = 20_000,
) -> None:
    """A simulated shopper against the running stack: events in, recommendations out, step by step."""
    from vitrine.demo import run

    _quiet_client_logs()
    try:
        asyncio.run(run(_settings(), typer.echo, background_events))
    except Exception as exc:  # noqa: BLE001
        raise _fail(RuntimeError(f"demo failed ({type(exc).__name__}: {exc}); is the stack up? (`make up`)")) from exc


from vitrine.commands.simulate import simulate  # noqa: E402
app.command("simulate")(simulate)


if __name__ == "__main__":
    app()
