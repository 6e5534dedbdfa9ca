"""Fallback quality: the gateway's model-free answers (popularity, the item → next-item transitions table)
measured offline, overall and on short histories — the figures behind `gateway.transitions_max_history`
and the degrade chain's order (docs/benchmarks.md, "Fallback quality").

Baselines only (`evaluate_baselines`: same rows, split, vocabulary and metrics as `vitrine train`), no
neural training: seconds on the default preset.

    .venv/bin/python -m vitrine.export.fallback_quality --preset default
"""

from __future__ import annotations

import argparse
import json
from typing import Final

from vitrine.export.baselines import evaluate_baselines
from vitrine.export.data import synthetic
from vitrine.export.data.sequences import build

RANKERS: Final = ("popularity", "transitions")
SLICES: Final = ("history 1", "history 2-4")
METRICS: Final = ("recall@10", "ndcg@10")


def measure(preset: str) -> dict[str, dict[str, dict[str, float]]]:
    """ranker → scope ("overall" or a history slice) → metric (and `rows`)."""
    report = evaluate_baselines(build(synthetic.generate(synthetic.preset(preset))))
    return {name: {"overall": {m: report.metrics[name][m] for m in METRICS},
                   **{s: {m: report.slices[name][s][m] for m in (*METRICS, "rows")} for s in SLICES}}
            for name in RANKERS}


def table(figures: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per ranker, Recall@10 / NDCG@10 overall and per slice."""
    rows_of = {s: int(figures[RANKERS[0]][s]["rows"]) for s in SLICES}
    header = ["ranker", "overall R@10", "overall NDCG@10"]
    for s in SLICES:
        header += [f"{s} ({rows_of[s]:,} rows) R@10", f"{s} NDCG@10"]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for name in RANKERS:
        cells = [name] + [f"{figures[name][scope][m]:.3f}" for scope in ("overall", *SLICES) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default", help="synthetic storefront preset (tiny, small, default, ...)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args()
    figures = measure(args.preset)
    print(json.dumps(figures, indent=2) if args.json else table(figures))


if __name__ == "__main__":
    main()
