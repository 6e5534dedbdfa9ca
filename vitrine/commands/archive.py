"""`vitrine archive …`: the event archive service (Kafka → Parquet by date and hour)."""

from __future__ import annotations

import typer

app = typer.Typer(help="The event archive: `events` and `recs.served` as Parquet files by date and hour.", no_args_is_help=True)


@app.command("run")
def run() -> None:
    """Archive `events` and `recs.served` into Parquet files until SIGTERM (settings: VITRINE_ARCHIVE__*)."""
    from vitrine.cli import _settings
    from vitrine.services.archive.consumer import main

    main(_settings())
