"""The `vitrine` command line. Sub-commands stay thin: they parse, build `Settings`, and call a service."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from typing import Annotated

import typer
from pydantic import ValidationError

from vitrine.settings import Settings

app = typer.Typer(help="Vitrine: real-time recommendations on Kafka, Redis and Triton.", no_args_is_help=True)
stack_app = typer.Typer(help="The local stack: Redis, Kafka, Triton, Prometheus under supervisord.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")


def _quiet_client_logs() -> None:
    """aiokafka logs every refused connection at ERROR; while the stack starts those are expected."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


def _settings() -> Settings:
    try:
        return Settings()
    except (ValidationError, FileNotFoundError, ValueError) as exc:
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
    component: Annotated[str, typer.Argument(help="redis, redis-exporter, kafka, triton, prometheus or supervisord")],
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


if __name__ == "__main__":
    app()
