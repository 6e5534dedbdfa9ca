"""`vitrine report`: the key panels, rendered from the dashboards' own PromQL to one PNG (matplotlib).

For the README and for people without Grafana at hand. The queries are taken from the dashboard
JSON, so the picture shows exactly what the dashboards show.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from vitrine.settings import REPO_ROOT

DASHBOARDS = REPO_ROOT / "grafana" / "dashboards"
KEY_PANELS = (
    ("serving.json", "Requests per second by variant"),
    ("serving.json", "Latency p50 / p95 / p99 by variant"),
    ("serving.json", "Latency p99 per stage"),
    ("serving.json", "Degraded answers by reason"),
    ("features.json", "Events applied per second by type"),
    ("features.json", "Freshness p50 / p99"),
    ("experiments.json", "Traffic per variant"),
    ("experiments.json", "Input drift (PSI) per feature"),
)
SUBSTITUTIONS = {"$__rate_interval": "1m", "$variant": ".*", "$model": ".*"}


def expand(expr: str) -> str:
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    return expr


def panel(file_name: str, title: str) -> dict:
    dashboard = json.loads((DASHBOARDS / file_name).read_text())
    return next(p for p in dashboard["panels"] if p["title"] == title)


def _legend(template: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        template = template.replace("{{" + key + "}}", value)
    return template


def render(prometheus_url: str, out: Path, minutes: float = 15, step_s: float = 5) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = time.time()
    start = end - minutes * 60
    fig, axes = plt.subplots(4, 2, figsize=(14, 13), constrained_layout=True)
    with httpx.Client(base_url=prometheus_url, timeout=10) as client:
        for ax, (file_name, title) in zip(axes.flat, KEY_PANELS, strict=True):
            spec = panel(file_name, title)
            unit = spec["fieldConfig"]["defaults"]["unit"]
            scale = 1000 if unit == "s" else 1
            for target in spec["targets"]:
                reply = client.get("/api/v1/query_range", params={"query": expand(target["expr"]), "start": start, "end": end, "step": step_s}).json()
                for series in reply.get("data", {}).get("result", []):
                    xs = [datetime.fromtimestamp(float(t), UTC) for t, _ in series["values"]]
                    ys = [float(v) * scale for _, v in series["values"]]
                    ax.plot(xs, ys, label=_legend(target["legendFormat"], series["metric"]) or target["expr"][:30])
            ax.set_title(title, fontsize=10)
            ax.set_ylabel("ms" if unit == "s" else unit)
            ax.tick_params(labelsize=7)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="upper left")
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"Vitrine — last {minutes:g} minutes ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
