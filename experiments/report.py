"""`vitrine ab report`: one experiment's outcome, guardrails beside it, as a table, JSON and a PNG.

Everything here is pure (the look's analysis and decision, history and serving figures in; text, dict and a
picture out); the command (`vitrine/commands/ab_report.py`) fetches them from Redis and Prometheus.

The verdict is `decision.decide`'s: a variant "wins" on CTR only when its always-valid p-value — the running
minimum over every look of the experiment's phase, across revisions — is below α after Holm's correction
over the variants, and the sticky sample-ratio check has never flagged; the interval printed beside it is
the always-valid one (the running intersection), so the two always agree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vitrine.experiments.analysis import ExperimentAnalysis
from vitrine.experiments.decision import DECISION_METRIC, Decision
from vitrine.experiments.interleaving import InterleavingResult


@dataclass(frozen=True)
class Guardrail:
    """Serving health of one variant over the report's window, from the gateway's metrics in Prometheus."""

    variant: str
    requests_per_s: float
    p99_s: float
    degraded_ratio: float
    error_ratio: float


@dataclass
class Report:
    experiment: str
    revision: int
    mode: str
    weights: dict[str, int]
    analysis: ExperimentAnalysis | None
    interleaving: InterleavingResult | None
    guardrails: list[Guardrail]
    history: list[dict]
    decision: Decision | None = None
    phase: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def verdict(self) -> str:
        if self.decision is None:
            return "no outcomes yet"
        return self.decision.text

    def table(self) -> str:
        lines = [f"experiment {self.experiment!r} revision {self.revision} ({self.mode}), weights "
                 + ", ".join(f"{v} {w}%" for v, w in self.weights.items())
                 + (f"; one test over revisions {', '.join(map(str, self.phase))}" if len(self.phase) > 1 else ""), ""]
        if self.analysis is not None:
            lines.append(self.analysis.table())
        d = self.decision
        if d is not None and d.comparisons and self.interleaving is None:
            lines += ["", f"always-valid over {d.looks} looks{'':<6}{'interval of the difference (relative)':<40}{'p':>9}{'Holm p':>9}"]
            for c in d.comparisons:
                lines.append(f"{c.variant + ' ' + c.metric:<32}[{c.relative_low:+.2%}, {c.relative_high:+.2%}] ({c.estimator}){'':<8}"
                             f"{c.p_value:>9.3g}{c.adjusted_p:>9.3g}")
        if d is not None and d.guardrails:
            lines += ["", "guardrails (non-inferiority, always-valid): "
                      + "; ".join(f"{g.variant} {g.metric} ≥ −{g.margin:.0%}: {g.status.replace('_', '-')}" for g in d.guardrails)]
        if self.interleaving is not None:
            i = self.interleaving
            lines += [f"interleaving: {i.users} users; prefer {i.team_a}: {i.users_prefer_a}, prefer {i.team_b}: {i.users_prefer_b}, "
                      f"tied: {i.users_tied}",
                      f"  share preferring {i.team_a}: {i.preference_a:.1%} [{i.preference_low:.1%}, {i.preference_high:.1%}], "
                      f"sign test p = {i.p_value:.3g} (one look); always-valid [{i.sequential_low:.1%}, {i.sequential_high:.1%}], "
                      f"p = {i.sequential_p:.3g} this look; exposure-weighted {i.exposure_share_a:.1%}"]
        if self.guardrails:
            lines += ["", f"{'serving':<14}{'req/s':>8}{'p99 ms':>9}{'degraded':>10}{'errors':>9}"]
            for g in self.guardrails:
                lines.append(f"{g.variant:<14}{g.requests_per_s:>8.1f}{_ms(g.p99_s):>9}{g.degraded_ratio:>10.2%}{g.error_ratio:>9.2%}")
        lines += ["", "verdict: " + self.verdict(), *self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"experiment": self.experiment, "revision": self.revision, "mode": self.mode, "weights": self.weights,
                "phase": self.phase, "verdict": self.verdict(), "analysis": self.analysis.to_dict() if self.analysis else None,
                "interleaving": asdict(self.interleaving) if self.interleaving else None,
                "decision": self.decision.to_dict() if self.decision else None,
                "guardrails": [asdict(g) for g in self.guardrails], "looks": len(self.history), "notes": self.notes}


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def plot_history(report: Report, path: Path) -> None:
    """Relative lift of each variant with its 95 % interval at every look of the monitor (or the
    interleaving preference over time): how the evidence grew, and when it became conclusive."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    looks = report.history
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if report.mode == "interleave":
        teams = sorted({t for look in looks for t in look.get("preference", {})})
        for team in teams:
            points = [(look["ts_ms"], look["preference"][team]) for look in looks if team in look.get("preference", {})]
            if points:
                t0 = points[0][0]
                ax.plot([(t - t0) / 60_000 for t, _ in points], [v for _, v in points], marker=".", label=f"prefer {team}")
        ax.axhline(0.5, color="grey", lw=1)
        ax.set_ylabel("share of users preferring")
    else:
        keys = sorted({k for look in looks for k in look.get("lift", {}) if k.endswith(f":{DECISION_METRIC}")})
        t0 = looks[0]["ts_ms"] if looks else 0
        for key in keys:
            points = [(look["ts_ms"], *look["lift"][key]) for look in looks if key in look.get("lift", {})]
            xs = [(t - t0) / 60_000 for t, *_ in points]
            ax.plot(xs, [e for _, e, _, _ in points], marker=".", label=f"{key.split(':')[0]} vs control")
            ax.fill_between(xs, [lo for _, _, lo, _ in points], [hi for _, _, _, hi in points], alpha=0.2)
        ax.axhline(0.0, color="grey", lw=1)
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.set_ylabel("relative lift in CTR (95 % interval)")
    ax.set_xlabel("minutes since the first look")
    ax.set_title(f"{report.experiment} revision {report.revision}: {report.verdict()[:90]}", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
