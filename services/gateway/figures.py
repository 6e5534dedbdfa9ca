"""Per-variant serving figures over a window, read from the gateway's series in Prometheus.

One definition of the queries for everything that compares variants' serving health: `vitrine ab report`'s
guardrails and the rollout controller's judge (control and challenger over the same window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import httpx

from vitrine.services.gateway.metrics import DEGRADED, REQUEST_DURATION, REQUESTS

CLIENT_ERRORS = "OK|INVALID_ARGUMENT|UNAUTHENTICATED|PERMISSION_DENIED"
"""Status codes that are not the server's fault: not counted as errors."""


@dataclass(frozen=True)
class VariantFigures:
    variant: str
    requests_per_s: float
    p99_s: float
    """NaN when the variant answered nothing in the window."""
    degraded_ratio: float
    error_ratio: float


def queries(window: str) -> dict[str, str]:
    """PromQL by figure, each `by (variant)`; `window` is a Prometheus duration (e.g. `5m`, `12s`)."""
    return {
        "rate": f"sum by (variant) (rate({REQUESTS}[{window}]))",
        "p99": f"histogram_quantile(0.99, sum by (le, variant) (rate({REQUEST_DURATION}_bucket[{window}])))",
        "degraded": f"sum by (variant) (rate({DEGRADED}[{window}])) / sum by (variant) (rate({REQUESTS}{{code=\"OK\"}}[{window}]))",
        "errors": f"sum by (variant) (rate({REQUESTS}{{code!~\"{CLIENT_ERRORS}\"}}[{window}])) / sum by (variant) (rate({REQUESTS}[{window}]))",
    }


async def variant_figures(prometheus_url: str, variants: list[str], window: str, timeout_s: float = 5.0) -> list[VariantFigures]:
    """Each variant's request rate, p99, degraded and error ratio over `window` (a variant without series: rate 0, p99 NaN, ratios 0;
    a ratio over no requests in the window is NaN, as PromQL computes it).

    Raises httpx.HTTPError (Prometheus away or refusing the query), KeyError/ValueError (an unexpected answer)."""
    values: dict[str, dict[str, float]] = {}
    async with httpx.AsyncClient(base_url=prometheus_url, timeout=timeout_s) as client:
        for name, query in queries(window).items():
            reply = await client.get("/api/v1/query", params={"query": query})
            reply.raise_for_status()
            values[name] = {r["metric"].get("variant", ""): float(r["value"][1]) for r in reply.json()["data"]["result"]}
    return [VariantFigures(v, values["rate"].get(v, 0.0), values["p99"].get(v, math.nan), values["degraded"].get(v, 0.0),
                           values["errors"].get(v, 0.0)) for v in variants]
