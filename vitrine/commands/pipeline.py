"""`vitrine pipeline run|resume|abandon|status|list|reproduce`: the retraining pipeline (export/pipeline/).

Exit status of run/resume: 0 a challenger was exported and loaded, 1 failed, 2 usage, 3 rejected by the gate,
4 stopped by a data check, 5 another run holds the lock."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date, datetime
from typing import Annotated

import typer

app = typer.Typer(help="The retraining pipeline: validate → train → evaluate vs the champion → gate → export.", no_args_is_help=True)
TRIGGERS = ("manual", "schedule", "drift")


def _run_id(value: str | None) -> str | None:
    from vitrine.export.pipeline.record import check_run_id

    if value is None:
        return None
    try:
        return check_run_id(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


RunIdArgument = Annotated[str, typer.Argument(help="A run id (YYYYMMDDTHHMMSS-xxxxxx), see `vitrine pipeline list`.", callback=_run_id)]


def _pipeline(report: bool = True):  # noqa: ANN202
    from vitrine.cli import _settings
    from vitrine.export.pipeline.runner import Pipeline

    return Pipeline(_settings(), report=typer.echo if report else (lambda line: None))


def _end(record: dict, as_json: bool) -> None:
    from vitrine.export.pipeline.record import EXIT_CODES

    if as_json:
        typer.echo(json.dumps(record, indent=2, default=str))
    else:
        colour = typer.colors.GREEN if record["status"] == "succeeded" else typer.colors.RED
        typer.secho(f"run {record['run_id']}: {record['status']} — {record['reason']}", fg=colour)
        typer.echo(f"record: {_pipeline(False).recorder.artefacts(record['run_id'])}/record.json")
    raise typer.Exit(EXIT_CODES.get(record["status"], 1))


def _busy(exc: Exception) -> typer.Exit:
    from vitrine.export.pipeline.record import BUSY_EXIT

    typer.secho(f"busy: {exc}", fg=typer.colors.YELLOW, err=True)
    return typer.Exit(BUSY_EXIT)


def _on_a_run(action: Callable[[], dict]) -> dict:
    """resume/abandon/reproduce of one recorded run: busy → exit 5, an unknown or unfit run → error, exit 1."""
    from vitrine.export.pipeline.lock import PipelineBusy
    from vitrine.export.pipeline.runner import PipelineError

    try:
        return action()
    except PipelineBusy as exc:
        raise _busy(exc) from exc
    except (KeyError, PipelineError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc


def _cause(value: str) -> str:
    from vitrine.services.triggers.webhook import CAUSE_MAX_CHARS

    if len(value) > CAUSE_MAX_CHARS or not value.isprintable():
        raise typer.BadParameter(f"at most {CAUSE_MAX_CHARS} printable characters (one line)")
    return value


@app.command("run")
def run(
    trigger: Annotated[str, typer.Option(help="Why this run starts: manual, schedule or drift (recorded).")] = "manual",
    window_days: Annotated[int | None, typer.Option(min=1, max=365, help="Trailing window of the archive in days (default: settings pipeline.window_days).")] = None,
    until: Annotated[datetime | None, typer.Option(formats=["%Y-%m-%d"], help="Last UTC date of the window (default: today).")] = None,
    run_id: Annotated[str | None, typer.Option(help="Run id to use (the trigger service passes one it has already answered with).", callback=_run_id)] = None,
    no_champion: Annotated[bool, typer.Option("--no-champion", help="Do not compare with the served champion (first deployment): baselines only.")] = False,
    cause: Annotated[str, typer.Option(help="What started the run, in words (the trigger service names the alerts); recorded in the run and the registry.",
                                       callback=_cause)] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print the final record as JSON.")] = False,
) -> None:
    """One pipeline run; every step is recorded under <stack.home>/pipeline/runs/<run_id>/record.json."""
    from vitrine.export.pipeline.lock import PipelineBusy

    if trigger not in TRIGGERS:
        raise typer.BadParameter(f"{trigger!r} is not one of {', '.join(TRIGGERS)}", param_hint="--trigger")
    until_date: date | None = until.date() if until else None
    try:
        record = _pipeline(not as_json).run(trigger, window_days, until_date, run_id, no_champion, cause)
    except PipelineBusy as exc:
        raise _busy(exc) from exc
    except FileExistsError as exc:
        raise typer.BadParameter(str(exc), param_hint="--run-id") from exc
    _end(record, as_json)


@app.command("resume")
def resume(run_id: RunIdArgument, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Continue a crashed or failed run from its first unfinished step, with its recorded artefacts."""
    record = _on_a_run(lambda: _pipeline(not as_json).resume(run_id))
    _end(record, as_json)


@app.command("abandon")
def abandon(run_id: RunIdArgument) -> None:
    """Mark a crashed run (still `running`, its process gone) failed."""
    record = _on_a_run(lambda: _pipeline(False).abandon(run_id))
    typer.echo(f"run {run_id}: {record['status']} ({record['reason']})")


def _shown_status(record: dict, locked: bool, holder: dict) -> str:
    if record["status"] == "running" and not (locked and holder.get("run_id") == record["run_id"]):
        return "crashed"  # running on paper, but nobody holds the lock for it
    return record["status"]


@app.command("list")
def list_runs(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Newest runs shown.")] = 20,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Runs, newest last: id, trigger, status, window, reason."""
    from vitrine.export.pipeline.lock import holder, is_locked

    pipeline = _pipeline(False)
    runs = pipeline.recorder.runs()[-limit:]
    locked, who = is_locked(pipeline.home), holder(pipeline.home)
    if as_json:
        typer.echo(json.dumps([{**r, "shown_status": _shown_status(r, locked, who)} for r in runs], indent=2, default=str))
        return
    if not runs:
        typer.echo("no pipeline runs yet")
        return
    for r in runs:
        window = r["params"]["window"]
        typer.echo(f"{r['run_id']}  {r['trigger']:<8}  {_shown_status(r, locked, who):<9}  {window['since']}…{window['until']}  {r['reason'][:100]}")


@app.command("status")
def status(
    run_id: Annotated[str | None, typer.Argument(help="A run id; default: the newest run.", callback=_run_id)] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One run's steps with status, duration and key numbers (default: the newest run)."""
    from vitrine.export.pipeline.lock import holder, is_locked
    from vitrine.export.pipeline.validate import format_checks

    pipeline = _pipeline(False)
    try:
        record = pipeline.recorder.load(run_id) if run_id else pipeline.recorder.runs()[-1]
    except (KeyError, IndexError) as exc:
        typer.secho(f"error: {exc if run_id else 'no pipeline runs yet'}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps(record, indent=2, default=str))
        return
    shown = _shown_status(record, is_locked(pipeline.home), holder(pipeline.home))
    typer.echo(f"run {record['run_id']} (trigger {record['trigger']}): {shown} — {record['reason']}")
    if record.get("cause"):
        typer.echo(f"  started by: {record['cause']}")
    for name, step in record["steps"].items():
        duration = f"{step['duration_s']:.1f}s" if "duration_s" in step else ""
        typer.echo(f"  {name:<9} {step['status']:<10} {duration:>8}  {step.get('reason', '')[:120]}")
    if record["steps"]["validate"].get("checks"):
        typer.echo("\n" + format_checks(record["steps"]["validate"]["checks"]))


@app.command("reproduce")
def reproduce(run_id: RunIdArgument, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Retrain a run from its recorded archive partitions (same fingerprint) and parameters; compare metrics."""
    result = _on_a_run(lambda: _pipeline(False).reproduce(run_id))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        for model, c in result["models"].items():
            typer.echo(f"{model}: {'same' if c['equal'] else 'DIFFERENT'} metrics (max |Δ| {c['max_abs_diff']:.2e}, "
                       f"tolerance {result['tolerance']:g}); recorded {c['recorded']}, reproduced {c['reproduced']}")
    raise typer.Exit(0 if result["equal"] else 1)
