"""The promotion gate: a candidate model is exported only if it earns its place.

Three checks on the validation metrics recorded by `train()` (same rows for every ranker):

1. **Strongest baseline, overall.** The candidate must beat the best simple counter (popularity,
   transitions, co-occurrence — `baselines.py`) on the chosen metric by a relative margin: a model
   that only ties a transition table cannot justify a GPU, Triton or an A/B test.
2. **Champion.** When the served model was measured on the same data (same fingerprint and cutoff),
   the candidate must not be worse than it beyond a tolerance. Measured on other data the figures are
   not comparable, and the table says so instead of pretending.
3. **Slices.** In no slice (history-length buckets, head vs. long-tail targets: `metrics.py`) may the
   candidate lose to the strongest baseline or to the champion beyond a tolerance: an average gain
   must not hide shoppers with short histories or the long tail being served worse. Slices with
   fewer than `min_slice_rows` targets are shown but not judged (too noisy to block a release).

Margins and tolerances are relative (a fraction of the reference's value), so one policy fits data
sets whose metrics differ by an order of magnitude. Their values are configured in the typed settings
(`vitrine/settings.py` `GateSettings`, env `VITRINE_GATE__MARGIN` etc.; `vitrine export` flags override
them); `GatePolicy` is the value object the checks take, built from those settings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vitrine.contracts import ranker
from vitrine.export.metrics import METRIC_NAMES
from vitrine.export.triton_repository import versions
from vitrine.settings import GateSettings

Metrics = Mapping[str, float]
SliceMetrics = Mapping[str, Metrics]
CANDIDATE, CHAMPION = "candidate", "champion"
_DEFAULTS = GateSettings()


@dataclass(frozen=True)
class GatePolicy:
    """Every threshold of the gate, in one place."""

    # Defaults are the settings' defaults: the numbers live in GateSettings only.
    metric: str = _DEFAULTS.metric
    margin: float = _DEFAULTS.margin
    """The candidate must reach strongest baseline × (1 + margin) overall."""
    champion_tolerance: float = _DEFAULTS.champion_tolerance
    """The candidate may fall below the champion by at most this fraction of the champion's value."""
    slice_tolerance: float = _DEFAULTS.slice_tolerance
    """In a slice the candidate may fall below the reference by at most this fraction of its value."""
    min_slice_rows: int = _DEFAULTS.min_slice_rows
    """Slices with fewer validation targets are reported but not judged."""
    champion_margin: float | None = None
    """None (`vitrine export`): the candidate may fall below the champion by `champion_tolerance`. A number (the
    pipeline): it must *beat* the champion by this relative margin on `metric`, and every other metric may fall
    at most `champion_tolerance` below the champion's — a challenger has to earn its A/B test."""

    def __post_init__(self) -> None:
        if self.metric not in METRIC_NAMES:
            raise ValueError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRIC_NAMES)}")
        if not 0 <= self.margin < 1 or not 0 <= self.champion_tolerance < 1 or not 0 <= self.slice_tolerance < 1:
            raise ValueError("margin and tolerances are fractions in [0, 1)")
        if self.champion_margin is not None and not 0 <= self.champion_margin < 1:
            raise ValueError("champion_margin is a fraction in [0, 1)")

    @classmethod
    def from_settings(cls, settings: GateSettings) -> GatePolicy:
        """The policy the settings configure (their bounds are checked by pydantic, then again here)."""
        return cls(metric=settings.metric, margin=settings.margin, champion_tolerance=settings.champion_tolerance,
                   slice_tolerance=settings.slice_tolerance, min_slice_rows=settings.min_slice_rows)


@dataclass(frozen=True)
class GateCheck:
    """One row of the gate's table; `passed` is None for a row that is shown but not judged."""

    check: str
    reference: str
    candidate: float
    reference_value: float
    required: float
    passed: bool | None
    note: str = ""


@dataclass(frozen=True)
class GateDecision:
    accepted: bool
    reasons: list[str]
    """One sentence per failed check (empty when accepted)."""
    table: list[GateCheck] = field(default_factory=list)
    metric: str = "recall@10"

    def format(self) -> str:
        """The table as aligned text, for the CLI and logs."""
        header = ("check", "against", f"candidate {self.metric}", "reference", "required", "result")
        rows = [header] + [
            (c.check, c.reference, f"{c.candidate:.4f}", f"{c.reference_value:.4f}", f"≥ {c.required:.4f}",
             {True: "pass", False: "FAIL", None: "not judged"}[c.passed] + (f" ({c.note})" if c.note else ""))
            for c in self.table
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows)


def gate(
    candidate_metrics: Metrics,
    baselines: Mapping[str, Metrics],
    champion: Metrics | None = None,
    slices: Mapping[str, SliceMetrics] | None = None,
    policy: GatePolicy = GatePolicy(),
) -> GateDecision:
    """Decide whether a candidate may be exported.

    `slices` maps a ranker (`"candidate"`, a baseline's name, `"champion"`) to its per-slice metrics,
    each with a `rows` count; a ranker missing there is simply not compared per slice.
    """
    if not baselines:
        raise ValueError("the gate needs at least one baseline's metrics")
    metric = policy.metric
    best = max(baselines, key=lambda name: baselines[name][metric])
    table: list[GateCheck] = []
    reasons: list[str] = []

    def judge(check: str, reference: str, ours: float, theirs: float, required: float, note: str = "", name: str = metric) -> None:
        passed = ours >= required
        table.append(GateCheck(check, reference, ours, theirs, required, passed, note))
        if not passed:
            reasons.append(f"{check}: {name} {ours:.4f} < {required:.4f} required against {reference} ({theirs:.4f}{', ' + note if note else ''})")

    judge("overall", f"{best} (strongest baseline)", candidate_metrics[metric], baselines[best][metric],
          baselines[best][metric] * (1 + policy.margin), f"margin {policy.margin:.0%}")
    if champion is not None and policy.champion_margin is None:
        judge("overall", CHAMPION, candidate_metrics[metric], champion[metric],
              champion[metric] * (1 - policy.champion_tolerance), f"tolerance {policy.champion_tolerance:.0%}")
    elif champion is not None:
        judge("overall", CHAMPION, candidate_metrics[metric], champion[metric],
              champion[metric] * (1 + policy.champion_margin), f"margin {policy.champion_margin:.0%}")
        for other in (m for m in METRIC_NAMES if m != metric and m in champion and m in candidate_metrics):
            judge(f"overall {other}", CHAMPION, candidate_metrics[other], champion[other],
                  champion[other] * (1 - policy.champion_tolerance), f"{other}, tolerance {policy.champion_tolerance:.0%}", name=other)
    ours_by_slice = (slices or {}).get(CANDIDATE, {})
    for reference in (best, CHAMPION):
        theirs_by_slice = (slices or {}).get(reference)
        if theirs_by_slice is None:
            continue
        for name, ours in ours_by_slice.items():
            if name not in theirs_by_slice:
                continue
            theirs = theirs_by_slice[name][metric]
            required = theirs * (1 - policy.slice_tolerance)
            if ours.get("rows", 0) < policy.min_slice_rows:
                table.append(GateCheck(f"slice '{name}'", reference, ours[metric], theirs, required, None,
                                       f"{int(ours.get('rows', 0))} rows < {policy.min_slice_rows}"))
                continue
            judge(f"slice '{name}'", reference, ours[metric], theirs, required, f"tolerance {policy.slice_tolerance:.0%}")
    return GateDecision(accepted=not reasons, reasons=reasons, table=table, metric=metric)


class GateError(ValueError):
    """A run cannot be gated (e.g. it was recorded before baselines were part of every evaluation)."""


def champion_record(model_folder: Path, candidate: Mapping[str, object]) -> tuple[dict | None, str]:
    """The newest served version's run record when it was measured on the candidate's data, else why not."""
    served = versions(model_folder) if model_folder.is_dir() else []
    if not served:
        return None, "no served version"
    metadata_file = model_folder / str(served[-1]) / ranker.METADATA_FILE
    if not metadata_file.is_file():
        return None, f"v{served[-1]} has no {ranker.METADATA_FILE}"
    record = json.loads(metadata_file.read_text())["run"]
    same = ("fingerprint", "cutoff_ms")
    theirs, ours = record.get("data", {}), candidate.get("data", {})
    if any(theirs.get(key) != ours.get(key) for key in same):  # type: ignore[union-attr]
        return None, f"v{served[-1]} was measured on other data (fingerprint/cutoff differ): not comparable"
    return record, f"v{served[-1]}"


def gate_run(record: Mapping[str, object], champion: Mapping[str, object] | None = None,
             policy: GatePolicy = GatePolicy()) -> GateDecision:
    """The gate applied to a run record from `train()` (and optionally the champion's run record)."""
    section = record.get("baselines")
    if not isinstance(section, Mapping) or "metrics" not in section:
        raise GateError("this run was recorded without baseline metrics; train it again to gate it")
    metrics: Mapping[str, Metrics] = record["metrics"]  # type: ignore[assignment]
    slice_metrics: Mapping[str, SliceMetrics] = record.get("slice_metrics", {})  # type: ignore[assignment]
    slices: dict[str, SliceMetrics] = {CANDIDATE: slice_metrics.get("model", {})}
    slices.update({name: slice_metrics[name] for name in section["metrics"] if name in slice_metrics})
    champion_metrics = None
    if champion is not None:
        champion_metrics = champion["metrics"]["model"]  # type: ignore[index]
        if "model" in champion.get("slice_metrics", {}):  # type: ignore[operator]
            slices[CHAMPION] = champion["slice_metrics"]["model"]  # type: ignore[index]
    return gate(metrics["model"], section["metrics"], champion_metrics, slices, policy)
