"""`vitrine simulate`: simulated shoppers who react to what the gateway shows them (services/simulator/)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer


def simulate(
    rate: Annotated[float, typer.Option(min=0.1, max=5_000, help="Shopper visits per second (open loop), one request each.")] = 20,
    duration: Annotated[float, typer.Option(min=1, max=24 * 3600, help="Seconds of arrivals.")] = 60,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Arrivals, shoppers and their reactions.")] = 0,
    k: Annotated[int, typer.Option(min=1, max=1000, help="Items asked for per request.")] = 10,
    arrivals: Annotated[str, typer.Option(help="poisson or constant")] = "poisson",
    dwell: Annotated[float, typer.Option(min=0, max=60, help="Seconds from a shopper's page view to her request.")] = 0.3,
    users: Annotated[int | None, typer.Option(min=1, max=10_000_000, help="Shoppers drawn from the first N storefront users (default: all).")] = None,
    user_prefix: Annotated[str, typer.Option(help="Prefix of the simulated user ids (a set of shoppers of its own).")] = "",
    preset: Annotated[str, typer.Option(help="Synthetic storefront the models were trained on (tiny|small|default|large|huge).")] = "default",
    storefront_seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Its seed.")] = 7,
    timeout: Annotated[float, typer.Option(min=0.01, max=60, help="Deadline of each request, seconds.")] = 1.0,
    max_in_flight: Annotated[int, typer.Option(min=1, max=100_000, help="Visits running at once; beyond, visits are skipped and counted.")] = 1000,
    key: Annotated[str, typer.Option("--key", envvar="VITRINE_API_KEY", help="Storefront API key.")] = "vitrine-demo-storefront",
    json_out: Annotated[Path | None, typer.Option("--json", dir_okay=False, help="Also write the summary as JSON.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    pre_period: Annotated[bool, typer.Option(help="Before the first visit, publish each shopper's history of the days before "
                                                  "(the outcome service's pre_events, CUPED's covariate).")] = True,
    pre_events: Annotated[float, typer.Option(min=0, max=10_000, help="Mean pre-period events of a shopper of average activity "
                                                                      "(Poisson, times her activity).")] = 8.0,
    pre_days: Annotated[float, typer.Option(min=0.01, max=60, help="The pre-period spans this many days before the run; at most "
                                                                   "the outcome service's look-back (outcomes.dedupe_window_s).")] = 6.0,
    activity_sd: Annotated[float, typer.Option(min=0, max=2, help="Spread (σ of the log) of the shoppers' latent activity, which scales "
                                                                  "their clicks, visits and pre-period events (0: all alike).")] = 0.7,
) -> None:
    """Simulated shoppers: ask the gateway, click / add to cart / buy by relevance and position, events to Kafka."""
    import re

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from vitrine.cli import _fail, _quiet_client_logs, _settings
    from vitrine.export.data import synthetic
    from vitrine.services.simulator.runner import Simulation, SimulationConfig, render
    from vitrine.services.simulator.shopper import ChoiceParams, PrePeriod

    if arrivals not in ("poisson", "constant"):
        raise typer.BadParameter("choose poisson or constant", param_hint="--arrivals")
    if preset not in synthetic.PRESETS:
        raise typer.BadParameter(f"choose one of {', '.join(synthetic.PRESETS)}", param_hint="--preset")
    if user_prefix and not re.fullmatch(r"[A-Za-z0-9_.:@/-]{1,64}", user_prefix):
        raise typer.BadParameter("1-64 characters of [A-Za-z0-9_.:@/-]", param_hint="--user-prefix")
    _quiet_client_logs()
    settings = _settings()
    lookback_days = settings.outcomes.dedupe_window_s / 86400
    if pre_period and pre_days > lookback_days:
        raise typer.BadParameter(f"at most the outcome service's look-back, {lookback_days:g} days (outcomes.dedupe_window_s): "
                                 "older events are not counted", param_hint="--pre-days")
    config = SimulationConfig(rate=rate, duration_s=duration, seed=seed, k=k, arrivals=arrivals, dwell_s=dwell, preset=preset,
                              storefront_seed=storefront_seed, users=users, user_prefix=user_prefix, api_key=key,
                              timeout_s=timeout, max_in_flight=max_in_flight, params=ChoiceParams(activity_sd=activity_sd),
                              pre_period=PrePeriod(events=pre_events if pre_period else 0.0, days=pre_days))
    simulation = Simulation(settings, config)

    async def main():  # noqa: ANN202
        if not progress:
            return await simulation.run()
        with Progress(TextColumn("simulating"), BarColumn(), MofNCompleteColumn(), TextColumn("visits"),
                      TimeRemainingColumn(), transient=True) as bar:
            task = bar.add_task("visits", total=None)
            return await simulation.run(lambda done, due: bar.update(task, completed=done, total=due))

    try:
        report = asyncio.run(main())
    except Exception as exc:  # noqa: BLE001
        raise _fail(RuntimeError(f"simulation failed ({type(exc).__name__}: {exc}); is the stack up?")) from exc
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_dict(), indent=2))
    typer.echo(render(report))
