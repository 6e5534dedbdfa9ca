"""Reading a service's own Prometheus endpoint during a benchmark (no Prometheus server in between).

Benchmarks compare two scrapes taken before and after a run, so only totals are needed: a
histogram's sum and count (per value of one label, if asked), and its cumulative buckets.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


async def fetch(host: str, port: int) -> str:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"http://{host}:{port}/metrics")
        response.raise_for_status()
        return response.text


def histogram_totals(text: str, name: str, by: str | None = None) -> dict[str, tuple[float, float]]:
    """(sum, count) of histogram `name`, summed over its series — per value of label `by`, or under ""."""
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            entry = totals.setdefault(sample.labels.get(by, "") if by else "", [0.0, 0.0])
            if sample.name == f"{name}_sum":
                entry[0] += sample.value
            elif sample.name == f"{name}_count":
                entry[1] += sample.value
    return {key: (total, count) for key, (total, count) in totals.items()}


def histogram_buckets(text: str, name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of histogram `name`, summed over its series, in bound order."""
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for sample in family.samples:
                if sample.name == f"{name}_bucket":
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return sorted(buckets.items())
