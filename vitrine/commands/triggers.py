"""`vitrine triggers run`: the trigger service (Alertmanager webhook + schedule → pipeline runs)."""

from __future__ import annotations

import typer

app = typer.Typer(help="The trigger service: Alertmanager's webhook and a schedule start pipeline runs.", no_args_is_help=True)


@app.command("run")
def run() -> None:
    """Serve POST /alerts, GET /healthz and GET /metrics until SIGTERM (settings: VITRINE_TRIGGERS__*)."""
    from vitrine.cli import _fail, _settings
    from vitrine.services.triggers.server import main, read_token

    settings = _settings()
    try:
        read_token(settings.triggers_token_file)
    except (OSError, ValueError) as exc:
        raise _fail(exc) from exc
    main(settings)
