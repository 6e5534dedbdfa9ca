"""`vitrine data stats|sample|query`: the event archive read in place by DuckDB (views `events`, `exposures`).

The views cover the archive's committed files (the shadow rule applied: docs/archive.md), with `topic`,
`date` and `hour` as columns from the folder names. Results print as a table, or as JSON with `--json`.
"""

from __future__ import annotations

import json
import math
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(help="The event archive read in place with DuckDB: stats, samples, SQL.", no_args_is_help=True)

RootOption = Annotated[Path | None, typer.Option(file_okay=False, help="Archive folder (default: settings, `<stack home>/archive`).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
MAX_CELL = 60
"""Table output cuts longer cells (JSON output never does)."""


def _reader(root: Path | None):  # noqa: ANN202 - imported lazily so that `vitrine --help` stays fast
    from vitrine.cli import _settings
    from vitrine.services.archive.store import ArchiveReader, ArchiveStore

    settings = _settings()
    if root is not None and not root.is_dir():
        raise typer.BadParameter(f"{root} is not a folder", param_hint="--root")
    folder = root.resolve() if root is not None else settings.archive_root
    if not folder.is_dir():
        typer.secho(f"error: no archive at {folder} yet (is the `archive` component running? or pass --root)", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    return ArchiveReader(ArchiveStore(folder, {"events": settings.archive.events_topic, "exposures": settings.archive.exposures_topic}))


def _plain(value: Any) -> Any:
    """A DuckDB value as JSON can hold it."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _cell(value: Any) -> str:
    text = "" if value is None else json.dumps(_plain(value)) if isinstance(value, dict | list) else str(_plain(value))
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def format_table(columns: list[str], rows: list[tuple]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row[i], int | float | Decimal) or row[i] is None for row in rows) and rows != [] for i in range(len(columns))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _emit(columns: list[str], rows: list[tuple], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([{c: _plain(v) for c, v in zip(columns, row, strict=True)} for row in rows], indent=1))
    else:
        typer.echo(format_table(columns, rows))
        typer.echo(f"({len(rows)} rows)", err=True)


@app.command("stats")
def stats(root: RootOption = None, as_json: JsonOption = False) -> None:
    """Rows per table, date and event type; time coverage; files."""
    result = _reader(root).stats()
    if as_json:
        typer.echo(json.dumps(_plain(result), indent=1))
        return
    for table, s in result.items():
        typer.echo(f"{table} (topic {s['topic']}): {s['rows']:,} rows in {s['files']:,} files"
                   + (f", {s['first']} … {s['last']}" if s["rows"] else ""))
        if s["per_date"]:
            columns = ["date", "type", "rows", "hours"] if table == "events" else ["date", "rows", "hours"]
            typer.echo(format_table(columns, [tuple(d[c] for c in columns) for d in s["per_date"]]))
        typer.echo("")


@app.command("sample")
def sample(
    n: Annotated[int, typer.Option("--n", "-n", min=1, max=100_000, help="Rows to draw.")] = 10,
    table: Annotated[str, typer.Option(help="events or exposures.")] = "events",
    seed: Annotated[int, typer.Option(min=0, help="Seed of the draw (same archive, same seed: same rows).")] = 7,
    root: RootOption = None,
    as_json: JsonOption = False,
) -> None:
    """A random sample of rows (reservoir sampling), in time order."""
    if table not in ("events", "exposures"):
        raise typer.BadParameter(f"{table!r} is not events or exposures", param_hint="--table")
    result = _reader(root).sample(table, n, seed)
    _emit(result.columns, result.rows, as_json)


@app.command("query")
def query(
    sql: Annotated[str, typer.Argument(help="DuckDB SQL over the views `events` and `exposures`.")],
    root: RootOption = None,
    as_json: JsonOption = False,
) -> None:
    """Any SQL DuckDB understands, over the views `events` and `exposures` (e.g. "SELECT type, count(*) FROM events GROUP BY ALL")."""
    import duckdb

    if not sql.strip():
        raise typer.BadParameter("empty query", param_hint="SQL")
    reader = _reader(root)
    try:
        result = reader.query(sql)
    except duckdb.Error as exc:
        typer.secho(f"error: {type(exc).__name__}: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    _emit(result.columns, result.rows, as_json)
