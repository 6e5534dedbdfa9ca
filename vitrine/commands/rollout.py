"""`vitrine rollout start|status|pause|resume|abort` (a person's commands) and `vitrine rollouts run` (the controller).

The commands only change the rollout's state in Redis (and the experiment's split for start and abort); the controller
(`services/rollouts/controller.py`) judges and advances. docs/rollouts.md explains the policy and the audit.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import re
from datetime import UTC, datetime
from typing import Annotated

import typer

from vitrine.settings import check_steps

app = typer.Typer(help="Progressive rollouts: a challenger's share grows step by step, judged against control.", no_args_is_help=True)
service_app = typer.Typer(help="The rollout controller (judges and advances running rollouts).", no_args_is_help=True)

_TARGET = re.compile(r"^(?P<model>[a-z][a-z0-9_]{0,63})(?::(?P<version>[0-9]{1,10}))?$")
_DURATION = re.compile(r"^(?P<value>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_HOLD_S = 7 * 86_400


def parse_target(text: str) -> tuple[str, str]:
    """MODEL or MODEL:VERSION → (model, version; "" = the newest version Triton serves)."""
    match = _TARGET.match(text.strip())
    if not match:
        raise typer.BadParameter(f"{text!r} is not MODEL[:VERSION]: a model name (lower-case letters, digits, _; starting with a "
                                 "letter) and optionally ':' and a version number, e.g. sasrec or sasrec:3")
    return match["model"], match["version"] or ""


def parse_steps(text: str) -> tuple[int, ...]:
    """`1,5,25,50,100` → (1, 5, 25, 50, 100): whole percentages, strictly increasing, ending at 100."""
    try:
        steps = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r}: steps are comma-separated whole percentages, e.g. 1,5,25,50,100") from None
    try:
        return check_steps(steps)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def parse_hold(text: str) -> float:
    """`10m`, `30s`, `1h`, `1.5m` or plain seconds → seconds (1 s .. 7 days)."""
    match = _DURATION.match(text.strip())
    if not match:
        raise typer.BadParameter(f"{text!r} is not a duration: a number with an optional unit ms, s, m or h (e.g. 10m, 30s)")
    seconds = float(match["value"]) * _UNITS[match["unit"] or "s"]
    if not 1 <= seconds <= MAX_HOLD_S:
        raise typer.BadParameter(f"hold {text} = {seconds:g} s: between 1 s and 7 days")
    return seconds


async def _with_stores(settings, work):  # noqa: ANN001, ANN202
    import redis.asyncio as aioredis

    from vitrine.services.gateway.experiment import ExperimentStore
    from vitrine.services.rollouts.store import RolloutStore

    client = aioredis.Redis(host=settings.redis.host, port=settings.redis.port, socket_connect_timeout=2, socket_timeout=10)
    try:
        return await work(ExperimentStore(client, settings.features.namespace), RolloutStore(client, settings.features.namespace))
    finally:
        await client.aclose()


def _run(settings, work):  # noqa: ANN001, ANN202
    from redis.exceptions import RedisError

    from vitrine.cli import _fail
    from vitrine.services.gateway.experiment import ConflictError
    from vitrine.services.rollouts.controller import RolloutError
    from vitrine.services.rollouts.store import InvalidState, StateConflict

    try:
        return asyncio.run(_with_stores(settings, work))
    except (RolloutError, StateConflict, InvalidState, ConflictError, LookupError) as exc:
        raise _fail(exc) from exc
    except (OSError, RedisError) as exc:
        raise _fail(RuntimeError(f"cannot reach Redis at {settings.redis.host}:{settings.redis.port} ({exc}); is the stack up?")) from exc


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@app.command("start")
def start(
    target: Annotated[str, typer.Argument(metavar="MODEL[:VERSION]", help="The challenger: a model in Triton, optionally a version (default: the newest served).")],
    steps: Annotated[str | None, typer.Option(help="Challenger's share at each step in %, increasing, ending at 100 (default: rollouts.steps).")] = None,
    hold: Annotated[str | None, typer.Option(help="How long each step is held before it is judged: 30s, 10m, 1h (default: rollouts.hold_s).")] = None,
    skip_ready_check: Annotated[bool, typer.Option("--no-ready-check", help="Start even if Triton does not report the model ready (the judge rolls it back at the first step if it still is not).")] = False,
) -> None:
    """Route the first step's share to MODEL[:VERSION] as the experiment's last variant; the controller takes it from there."""
    import httpx

    from vitrine.cli import _fail, _settings
    from vitrine.services.rollouts.controller import start as start_rollout
    from vitrine.services.rollouts.controller import triton_readiness

    model, version = parse_target(target)
    planned_steps = parse_steps(steps) if steps is not None else None
    hold_s = parse_hold(hold) if hold is not None else None
    settings = _settings()
    planned_steps = planned_steps or settings.rollouts.steps
    hold_s = hold_s or settings.rollouts.hold_s
    if not skip_ready_check:
        try:
            ready = asyncio.run(triton_readiness(settings)(model, version))
        except (OSError, httpx.HTTPError) as exc:
            raise _fail(RuntimeError(f"cannot ask Triton at {settings.triton.http_url} whether {target} is ready ({exc})")) from exc
        if not ready:
            raise _fail(RuntimeError(f"{target} is not ready in Triton at {settings.triton.http_url}: load it first "
                                     "(or --no-ready-check)"))
    state = _run(settings, lambda experiments, store: start_rollout(experiments, store, model, version, planned_steps, hold_s, _who(),
                                                                    settings.rollouts.variant))
    typer.echo(f"rollout of {state.target} started: {state.percent} % as variant {state.variant!r} against {state.control!r}; "
               f"steps {list(state.steps)}, hold {state.hold_s:g} s (experiment revision {state.experiment_revision})")


def _describe(state, audit) -> str:  # noqa: ANN001
    if state is None:
        return "no rollout has been started"
    lines = [f"{state.target} as {state.variant!r} against {state.control!r}: {state.status}, {state.percent} % "
             f"(step {state.step + 1} of {len(state.steps)}: {list(state.steps)}), hold {state.hold_s:g} s, "
             f"experiment revision {state.experiment_revision}"]
    if state.reason:
        lines.append(f"  why: {state.reason}")
    lines.append("audit (newest first):")
    for e in audit:
        when = datetime.fromtimestamp(e.at_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        moves = " ".join(f"{k} {e.weights[0].get(k, 0)}→{e.weights[1].get(k, 0)}" for k in dict.fromkeys([*e.weights[0], *e.weights[1]]))
        lines.append(f"  {when}  {e.action:<9} by {e.by}: {e.status[0] or '-'} → {e.status[1]}; {moves}")
        lines.extend(f"      {r}" for r in e.reasons)
    return "\n".join(lines)


@app.command("status")
def status(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Audit entries shown (newest first).")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (state and audit, with the judge's numbers).")] = False,
) -> None:
    """The rollout's state and its audit: every decision with who, when, old → new split, reasons and numbers."""
    from vitrine.cli import _settings

    async def read(experiments, store):  # noqa: ANN001, ANN202
        return await store.load(), await store.audit(limit)

    state, audit = _run(_settings(), read)
    if as_json:
        typer.echo(json.dumps({"state": state.model_dump() if state else None, "audit": [e.model_dump() for e in audit]}, indent=2))
    else:
        typer.echo(_describe(state, audit))


def _command(action: str) -> None:
    from vitrine.cli import _settings
    from vitrine.services.rollouts.controller import command

    state = _run(_settings(), lambda experiments, store: command(experiments, store, action, _who()))
    typer.echo(f"rollout of {state.target}: {state.status} at {state.percent} %")


@app.command("pause")
def pause() -> None:
    """Keep the split as it is; the controller stops judging until `resume`."""
    _command("pause")


@app.command("resume")
def resume() -> None:
    """Continue a paused rollout: the current step's hold starts again."""
    _command("resume")


@app.command("abort")
def abort() -> None:
    """Route 0 % to the challenger and end the rollout (a person's rollback)."""
    _command("abort")


@service_app.command("run")
def run() -> None:
    """Judge and advance running rollouts every rollouts.interval_s until SIGTERM; /metrics on rollouts.metrics_port."""
    from vitrine.cli import _settings
    from vitrine.services.rollouts.controller import main

    main(_settings())
