"""`vitrine outcomes …`: the outcome attribution service."""

from __future__ import annotations

import typer

app = typer.Typer(help="The outcome attribution service: exposures joined with later events, per user.", no_args_is_help=True)


@app.command("run")
def run() -> None:
    """Join `recs.served` with `events` into per-user outcome rows in Redis until SIGTERM (settings: VITRINE_OUTCOMES__*)."""
    from vitrine.cli import _settings
    from vitrine.services.outcomes.consumer import main

    main(_settings())
