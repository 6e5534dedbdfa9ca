"""`vitrine models …`: what the model registry holds, and the registry hooks of `vitrine train` and `vitrine export`.

The registry is MLflow at `registry.url` (default: the local stack's `mlflow` component). Names, tags and
aliases are defined in `export/registry.py`; this module only parses, prints and decides what a missing
registry means for each command:

- `vitrine train`: logs each run when the registry answers. Default (no flag): a registry that does not
  answer is reported and skipped — the run folder is complete without it, and `vitrine export` logs it later.
  `--registry` makes an unreachable registry an error; `--no-registry` skips it.
- `vitrine export`: registers every exported version (alias `challenger`) and writes the registry URI of its
  metadata into its Triton config. A registry that does not answer is an error *before* anything is written,
  unless `--no-registry`: then the version is served with its metadata read from the local model repository,
  which only works where the gateway shares that folder (the local stack), never in production.
- `vitrine models promote NAME VERSION`: the version becomes `champion`, the previous champion `fallback`.
- `vitrine models fallback NAME`: the `fallback` back as champion, its Triton version made ready, routing moved
  (export/aliases.py; docs/registry.md).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from vitrine.export.registry import Registry, RegistryMissing
from vitrine.export.registry import connect as connect_registry
from vitrine.settings import Settings

app = typer.Typer(help="The model registry (MLflow): registered models, versions, aliases.", no_args_is_help=True)

MODEL_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
"""Registered model names are Triton model names (see vitrine.cli._model_name)."""
VERSION = re.compile(r"[1-9][0-9]{0,9}")


def connect(settings: Settings, why: str) -> Registry:
    """A client of the configured registry (`export.registry.connect`: a reachability check first)."""
    return connect_registry(settings.registry, why)


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(1)


def _name(value: str) -> str:
    if not MODEL_NAME.fullmatch(value):
        raise typer.BadParameter("a model name is lower-case letters, digits and _ (a Triton model name), at most 64")
    return value


def _version(value: str | None) -> str | None:
    if value is not None and not VERSION.fullmatch(value):
        raise typer.BadParameter("a registry version is a positive whole number, e.g. 3")
    return value


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M") if ms else "-"


def _metric(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"


def _registry_or_exit(settings: Settings):  # noqa: ANN202
    try:
        return connect(settings, "`vitrine models` reads it")
    except RegistryMissing as exc:
        raise _fail(str(exc)) from exc


def list_models(settings: Settings) -> list[dict[str, Any]]:
    return _registry_or_exit(settings).models()


@app.command("list")
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Every registered model (= Triton model name): versions, the newest, aliases (champion, challenger)."""
    from vitrine.cli import _settings

    rows = list_models(_settings())
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no registered models yet (`vitrine export` registers each exported version)")
        return
    table = [["model", "versions", "latest", "triton", "aliases"]]
    for row in rows:
        aliases = ", ".join(f"{alias}=v{version}" for alias, version in row["aliases"].items()) or "-"
        table.append([row["name"], str(row["versions"]), f"v{row['latest_version']}" if row["latest_version"] else "-",
                      f"v{row['latest_triton_version']}" if row["latest_triton_version"] else "-", aliases])
    typer.echo(_table(table))


@app.command("show")
def show_command(
    name: Annotated[str, typer.Argument(help="Registered model name (the Triton model name), e.g. gru4rec.", callback=_name)],
    version: Annotated[str | None, typer.Argument(help="Registry version; default: every version.", callback=_version)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """A registered model's versions (Triton version, aliases, run, Recall@10), or one version in detail."""
    from vitrine.cli import _settings
    from vitrine.export.registry import RegistryError

    registry = _registry_or_exit(_settings())
    try:
        result: Any = registry.version(name, version) if version else registry.versions(name)
    except RegistryError as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    if version is None:
        table = [["version", "triton", "aliases", "recall@10", "created", "run"]]
        for row in result:
            table.append([f"v{row['version']}", f"{row['triton_model']}:v{row['triton_version']}" if row["triton_version"] else "-",
                          ", ".join(row["aliases"]) or "-", _metric(row["recall_10"]), _when(row["created_ms"]), row["run_id"] or "-"])
        typer.echo(_table(table))
        return
    typer.echo(f"{result['name']} v{result['version']}  aliases: {', '.join(result['aliases']) or '-'}  "
               f"→ Triton {result['triton_model']}:v{result['triton_version']}")
    typer.echo(f"source {result['source']}  run {result['run_id']}  created {_when(result['created_ms'])}")
    for section in ("run_tags", "params"):
        if result.get(section):
            typer.echo(f"\n{section.replace('_', ' ')}:")
            typer.echo(_table([[k, str(v)] for k, v in result[section].items()]))
    headline = {k: v for k, v in result.get("metrics", {}).items() if ".slice." not in k and not k.startswith("slice.")}
    if headline:
        typer.echo("\nmetrics (overall; --json for every slice):")
        typer.echo(_table([[k, _metric(v)] for k, v in headline.items()]))


@app.command("card")
def card_command(
    name: Annotated[str, typer.Argument(help="Registered model name (the Triton model name), e.g. gru4rec.", callback=_name)],
    version: Annotated[str, typer.Argument(help="Registry version, e.g. 3.", callback=_version)],
    html: Annotated[bool, typer.Option("--html", help="The HTML rendering instead of Markdown.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", dir_okay=False, help="Write it to this file instead of printing it.")] = None,
) -> None:
    """A registered version's model card (data, metrics against the champion and the baselines overall and per slice,
    example recommendations with explanations), as logged to its run when it was registered."""
    from vitrine.cli import _settings
    from vitrine.export.model_card import CARD_HTML, CARD_MARKDOWN
    from vitrine.export.registry import RegistryError

    registry = _registry_or_exit(_settings())
    try:
        content = registry.card(name, version, CARD_HTML if html else CARD_MARKDOWN)
    except RegistryError as exc:
        raise _fail(str(exc)) from exc
    if out is None:
        typer.echo(content.decode())
        return
    out.write_bytes(content)
    typer.echo(f"{name} v{version}: model card written to {out}")


@app.command("promote")
def promote_command(
    name: Annotated[str, typer.Argument(help="Registered model name (the Triton model name), e.g. gru4rec.", callback=_name)],
    version: Annotated[str, typer.Argument(help="Registry version to make the champion, e.g. 3.", callback=_version)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the alias moves as JSON.")] = False,
) -> None:
    """Make a registered version the `champion`; the previous champion becomes the `fallback` (registry aliases only:
    routing is changed by `vitrine ab set` or a rollout, and `vitrine models fallback` undoes both)."""
    from vitrine.cli import _settings
    from vitrine.export.registry import RegistryError

    registry = _registry_or_exit(_settings())
    try:
        moves = registry.promote(name, version)
    except RegistryError as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps({"model": name, "moves": moves, "aliases": registry.aliases(name)}, indent=2))
        return
    if not moves:
        typer.echo(f"{name} version {version} is already the champion: nothing changed")
        return
    typer.echo(f"{name}: " + ", ".join(f"{alias} → v{target}" for alias, target in sorted(moves.items())))


@app.command("fallback")
def fallback_command(
    name: Annotated[str, typer.Argument(help="Registered model name (the Triton model name), e.g. gru4rec.", callback=_name)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Put the previous champion back in one command: the registry's `fallback` becomes `champion` (the old champion
    becomes `fallback`), its Triton version is made READY, and every variant serving MODEL at the old champion's
    version or at "newest" is pinned to it (audited; gateways follow within a second). Clients change nothing."""
    import asyncio

    from vitrine.cli import _settings
    from vitrine.export.aliases import FallbackError, fall_back

    settings = _settings()
    registry = _registry_or_exit(settings)
    try:
        result = asyncio.run(fall_back(settings, registry, name))
    except FallbackError as exc:
        raise _fail(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - e.g. the registry stopped answering mid-command: say so, no traceback
        raise _fail(f"{name}: fallback failed ({type(exc).__name__}: {exc}); `vitrine models list` and `vitrine ab show` "
                    "show what is in force") from exc
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    before = f"v{result.champion_before} (Triton v{result.triton_before})" if result.champion_before else "none"
    typer.echo(f"{name}: champion {before} → v{result.champion_after} (Triton v{result.triton_after}); "
               f"fallback now v{result.fallback_after or '-'}")
    typer.echo(f"Triton version {result.triton_after}: {result.readiness}")
    if result.variants_moved:
        typer.echo(f"routing: {', '.join(result.variants_moved)} now serve {name}:{result.triton_after} "
                   f"(experiment revision {result.experiment_revision})")
    else:
        typer.echo("routing: no variant served the old champion or \"newest\"; the experiment is unchanged")
