"""`vitrine bench stats`: the statistics proven by simulation — each test at one look (A/A error rates, power,
users needed, SRM), then the tests *as the verdict uses them* (one α across a ramp of revisions, CUPED inside the
sequential test, Holm, interleaving and SRM under continuous checking, guardrails, users needed as decided).

Pure computation (no stack needed). Prints the tables and the key ratios, and rewrites its own two sections
of docs/experiments.md (other sections of that file — e.g. Attribution — are left as they are).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated

import typer

RESULTS_HEADING = "## Statistics: measured by simulation"
DECISIONS_HEADING = "## Decisions as used: measured by simulation"
COMMAND = "vitrine bench stats"


def replace_section(path: Path, heading: str, body: str) -> None:
    """Put `body` under `heading` in the markdown file at `path`, replacing that section only.

    The file is read immediately before it is written (others edit other sections of it); a missing
    file is created, a missing section is appended.
    """
    text = path.read_text() if path.exists() else "# Experiments\n"
    section = f"{heading}\n\n{body.rstrip()}\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


def bench_stats(
    aa_experiments: Annotated[int, typer.Option(min=100, max=100_000, help="A/A experiments (≥ 1,000 for the documented figures).")] = 2000,
    users_per_arm: Annotated[int, typer.Option(min=200, max=100_000, help="Users per arm of each A/A experiment.")] = 2000,
    power_experiments: Annotated[int, typer.Option(min=20, max=10_000, help="Simulated experiments per power figure.")] = 400,
    srm_users: Annotated[int, typer.Option(min=1000, max=10_000_000, help="Users per SRM experiment.")] = 20_000,
    seed: Annotated[int, typer.Option(help="Seed of every random draw (the figures are reproducible).")] = 11,
    doc: Annotated[Path | None, typer.Option(dir_okay=False, help="Markdown file whose results section is rewritten; --no-doc: none.")] = Path("docs/experiments.md"),
    no_doc: Annotated[bool, typer.Option("--no-doc", help="Do not write the results into the docs.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw figures as JSON instead of the table.")] = False,
) -> None:
    """A/A false-positive rates (with and without peeking), power and users needed at a planted +10 % CTR
    (A/B, CUPED, interleaving), SRM detection; about a minute on two cores, no stack needed."""
    from vitrine.experiments.decision_simulation import run_decision_bench
    from vitrine.experiments.simulation import run_bench

    started = time.monotonic()
    say = lambda msg: typer.echo(msg, err=True)  # noqa: E731
    result = run_bench(aa_experiments, users_per_arm, power_experiments, srm_users, seed, progress=say)
    decisions = run_decision_bench(aa_experiments // 2, power_experiments, seed + 29, progress=say)
    defaults = (aa_experiments, users_per_arm, power_experiments, srm_users, seed) == (2000, 2000, 400, 20_000, 11)
    command = COMMAND if defaults else (f"{COMMAND} --aa-experiments {aa_experiments} --users-per-arm {users_per_arm} "
                                        f"--power-experiments {power_experiments} --srm-users {srm_users} --seed {seed}")
    decided_md = f"Reproduce: `{command}` (seeded; the same run as the section above).\n\n" + decisions.markdown()
    if as_json:
        typer.echo(json.dumps({"one_look": result.to_dict(), "as_decided": decisions.to_dict()}, indent=2, default=float))
    else:
        typer.echo(result.markdown(command))
        typer.echo("")
        typer.echo(decided_md)
        typer.echo("")
        typer.echo(result.ratios())
        typer.echo(decisions.ratios())
    typer.echo(f"({time.monotonic() - started:.0f} s)", err=True)
    if doc is not None and not no_doc:
        replace_section(doc, RESULTS_HEADING, result.markdown(command))
        replace_section(doc, DECISIONS_HEADING, decided_md)
        typer.echo(f"wrote the results sections of {doc}", err=True)
