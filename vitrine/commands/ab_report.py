"""`vitrine ab report`: which variant wins — the outcome rows from Redis (written by the outcome
service), the monitor's looks for the intervals over time, and guardrails from Prometheus."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import httpx
import typer

from vitrine.settings import Settings

GUARDRAIL_WINDOW = "5m"
PROMETHEUS_TIMEOUT_S = 5.0


async def _experiment_at(experiments, revision: int | None):  # noqa: ANN001, ANN202
    """The experiment as it was at `revision` (the audit log keeps every revision), or the current one."""
    from vitrine.services.gateway.experiment import Experiment

    current = await experiments.load()
    if current is None:
        raise LookupError("no experiment is stored yet (start the stack: the gateway seeds one)")
    if revision is None or revision == current.revision:
        return current
    for entry in await experiments.audit(10_000):
        if entry.get("new", {}).get("revision") == revision:
            return Experiment.model_validate(entry["new"])
    raise LookupError(f"revision {revision} is not in the experiment's audit log (current: {current.revision})")


async def guardrails(settings: Settings, variants: list[str], window: str = GUARDRAIL_WINDOW) -> list:
    """p99, degraded and error ratio per variant over `window`, from the gateway's series in Prometheus
    (`services/gateway/figures.py`, the queries the rollout judge reads too)."""
    from vitrine.experiments.report import Guardrail
    from vitrine.services.gateway.figures import variant_figures

    figures = await variant_figures(settings.prometheus.url, variants, window, PROMETHEUS_TIMEOUT_S)
    return [Guardrail(f.variant, f.requests_per_s, f.p99_s, f.degraded_ratio, f.error_ratio) for f in figures]


async def build(settings: Settings, revision: int | None, with_guardrails: bool):  # noqa: ANN201
    """The report of the experiment's phase ending at `revision` (default: the current one): the same look as the
    monitor's (`services/outcomes/looks.py`), decided with the evidence the monitor stored plus this look."""
    import redis.asyncio as aioredis

    from vitrine.contracts.exposures import INTERLEAVE
    from vitrine.experiments.report import Report
    from vitrine.services.gateway.experiment import ExperimentStore
    from vitrine.services.outcomes import looks
    from vitrine.services.outcomes.store import OutcomeStore

    client = aioredis.Redis(host=settings.redis.host, port=settings.redis.port, socket_connect_timeout=2, socket_timeout=10)
    try:
        experiments = ExperimentStore(client, settings.features.namespace)
        experiment = await _experiment_at(experiments, revision)
        store = OutcomeStore(client, settings.outcomes)
        history = await store.snapshots(experiment.name, experiment.revision)
        look = await looks.take(store, experiments, experiment, settings.outcomes)
        weights = {v.name: v.weight for v in experiment.variants}
        report = Report(experiment.name, experiment.revision, experiment.mode, weights, look.analysis, look.interleaving, [], history,
                        look.decision if look.evidence is not None else None, look.phase, list(look.notes))
        if with_guardrails:
            names = ["interleave"] if experiment.mode == INTERLEAVE else [v.name for v in experiment.variants]
            try:
                report.guardrails = await guardrails(settings, names)
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                report.notes.append(f"serving figures unavailable (Prometheus at {settings.prometheus.url}: {exc})")
        return report
    finally:
        await client.aclose()


def ab_report(
    revision: Annotated[int | None, typer.Option(min=1, help="Experiment revision (default: the current one).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False,
    png: Annotated[Path | None, typer.Option(dir_okay=False, help="Also draw the lift's interval at every look to this PNG.")] = None,
    with_guardrails: Annotated[bool, typer.Option("--guardrails/--no-guardrails", help="Per-variant p99, degraded and error ratio from Prometheus.")] = True,
) -> None:
    """Which variant wins: per-user outcomes with intervals, lift, fixed and always-valid tests, SRM, CUPED, interleaving, guardrails."""
    from redis.exceptions import RedisError

    from vitrine.cli import _fail, _settings
    from vitrine.experiments.report import plot_history

    settings = _settings()
    try:
        report = asyncio.run(build(settings, revision, with_guardrails))
    except LookupError as exc:
        raise _fail(exc) from exc
    except (OSError, RedisError) as exc:
        raise _fail(RuntimeError(f"cannot read the outcomes from Redis at {settings.redis.host}:{settings.redis.port} ({exc}); "
                                 "is the stack up?")) from exc
    if png is not None:
        plot_history(report, png)
    typer.echo(json.dumps(report.to_dict(), indent=2, default=float) if as_json else report.table())
