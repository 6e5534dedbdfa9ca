"""Reading histogram totals and buckets from a real exposition (prometheus_client's own output)."""

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from vitrine.loadtest import scrape


def _exposition() -> str:
    registry = CollectorRegistry()
    stage = Histogram("demo_stage_seconds", "stages", ("stage",), buckets=(0.001, 0.01), registry=registry)
    for value in (0.0005, 0.002, 0.02):
        stage.labels("features").observe(value)
    stage.labels("triton").observe(0.004)
    return generate_latest(registry).decode()


def test_totals_are_summed_over_series_or_split_by_one_label() -> None:
    text = _exposition()
    by_stage = scrape.histogram_totals(text, "demo_stage_seconds", by="stage")
    assert by_stage["features"] == (pytest.approx(0.0225), 3) and by_stage["triton"] == (pytest.approx(0.004), 1)
    assert scrape.histogram_totals(text, "demo_stage_seconds") == {"": (pytest.approx(0.0265), 4)}
    assert scrape.histogram_totals(text, "not_there") == {}


def test_buckets_are_cumulative_and_in_bound_order() -> None:
    assert scrape.histogram_buckets(_exposition(), "demo_stage_seconds") == [(0.001, 1), (0.01, 3), (float("inf"), 4)]
