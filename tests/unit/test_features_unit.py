"""Feature-side pieces that need no service: metric names, settings, histogram quantiles, publisher input."""

import asyncio

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from vitrine.loadtest.feature_throughput import histogram_quantile
from vitrine.services.events.publisher import publish
from aiokafka import TopicPartition

from vitrine.services.features import metrics
from vitrine.services.features.consumer import FeatureConsumer
from vitrine.services.member import Rebalance
from vitrine.services.features.store import POPULARITY_WEIGHT, user_prefix
from vitrine.contracts.events import EventType
from vitrine.settings import FeaturesSettings, Settings


def test_metric_names_follow_prometheus_conventions_and_are_all_exported() -> None:
    """Every name in metrics.py is exported as a sample with the value recorded (a HELP line alone is not an
    export), counters as counters ending in _total."""
    registry = CollectorRegistry()
    m = metrics.FeatureMetrics(registry)
    m.consumed.labels("events").inc(3)
    m.applied.labels("view").inc(2)
    m.deduplicated.labels("click").inc()
    m.rejected.labels("not_json").inc(4)
    m.write_retries.inc(5)
    m.offset_rewinds.inc(6)
    m.dlq_spilled.labels("not_json").inc(7)
    m.batch_size.observe(10)
    m.batch_duration.observe(0.002)
    m.freshness.observe(0.5)
    m.lag.labels("events", "0").set(8)
    m.assigned.set(9)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    expected = {
        metrics.EVENTS_CONSUMED: ({"topic": "events"}, 3), metrics.EVENTS_APPLIED: ({"type": "view"}, 2),
        metrics.EVENTS_DEDUPLICATED: ({"type": "click"}, 1), metrics.EVENTS_REJECTED: ({"reason": "not_json"}, 4),
        metrics.WRITE_RETRIES: ({}, 5), metrics.OFFSET_REWINDS: ({}, 6), metrics.DLQ_SPILLED: ({"reason": "not_json"}, 7),
        metrics.BATCH_SIZE + "_count": ({}, 1), metrics.BATCH_DURATION + "_count": ({}, 1), metrics.FRESHNESS + "_count": ({}, 1),
        metrics.CONSUMER_LAG: ({"partition": "0", "topic": "events"}, 8), metrics.ASSIGNED_PARTITIONS: ({}, 9),
    }
    names = [v for k, v in vars(metrics).items() if k.isupper() and isinstance(v, str) and v.startswith("vitrine_")]
    assert sorted(names) == sorted(n.removesuffix("_count") for n in expected)  # a new name needs a line above
    for sample, (labels, value) in expected.items():
        assert samples.get((sample, tuple(sorted(labels.items())))) == value, sample
    assert samples[(metrics.BATCH_SIZE + "_bucket", (("le", "10.0"),))] == 1
    for name in names:
        assert name.startswith("vitrine_features_")
        family = families.get(name.removesuffix("_total")) or families.get(name)
        assert family is not None and (family.type == "counter") == name.endswith("_total"), (name, family and family.type)
    assert metrics.FRESHNESS.endswith("_seconds") and metrics.BATCH_DURATION.endswith("_seconds")


def test_feature_settings_reject_nonsense() -> None:
    with pytest.raises(ValidationError, match="ascending"):
        FeaturesSettings(windows_s=(3600, 300))
    with pytest.raises(ValidationError, match="namespace"):
        FeaturesSettings(namespace="Bad Space")
    with pytest.raises(ValidationError, match="events_topic"):
        FeaturesSettings(events_topic="no spaces allowed")
    with pytest.raises(ValidationError, match="max_batch"):
        FeaturesSettings(max_batch=0)


def test_a_users_keys_share_one_cluster_slot() -> None:
    prefix = user_prefix("vt", "u:42")
    assert prefix == "vt:{u:u:42}"  # the hash tag is the part in braces: every key of the user


def test_purchases_weigh_most() -> None:
    assert [POPULARITY_WEIGHT[t] for t in EventType] == sorted(POPULARITY_WEIGHT.values())


def test_histogram_quantile_matches_prometheus_on_a_known_histogram() -> None:
    buckets = [(0.01, 50.0), (0.05, 90.0), (0.1, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.03)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.095)


def test_publisher_refuses_a_non_positive_rate() -> None:
    with pytest.raises(ValueError, match="rate must be positive"):
        asyncio.run(publish([], "127.0.0.1:1", "events", rate=0))


def test_settings_travel_to_child_processes_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitrine.services.stack.components import settings_env

    original = Settings().shifted(7)
    for key, value in settings_env(original).items():
        monkeypatch.setenv(key, value)
    assert Settings() == original


@pytest.mark.timeout(10)
async def test_revocation_waits_for_the_batch_in_flight_commits_then_drops_the_lag_series(caplog: pytest.LogCaptureFixture) -> None:
    """The real listener and consumer, no broker: the commit attempt is observed through its log line (an
    unstarted aiokafka consumer refuses to commit, which the consumer logs with the offsets it tried)."""
    owner = FeatureConsumer(Settings())
    kept, revoked = TopicPartition("events", 0), TopicPartition("events", 1)
    owner.processed = {kept: 10, revoked: 20}
    for tp in (kept, revoked):
        owner.metrics.lag.labels(tp.topic, str(tp.partition)).set(5)
    try:
        await owner.batch_lock.acquire()  # a batch is in flight
        revocation = asyncio.create_task(Rebalance(owner).on_partitions_revoked({revoked}))
        for _ in range(10):  # yield to the event loop: the revocation runs as far as it can
            await asyncio.sleep(0)
        assert not revocation.done() and "commit of" not in caplog.text
        owner.batch_lock.release()  # the batch ends
        await asyncio.wait_for(revocation, 5)
        assert "commit of events:1=20 to Kafka failed" in caplog.text and "events:0" not in caplog.text
        assert owner.processed == {kept: 10}
        exported = generate_latest(owner.registry).decode()
        assert 'partition="0"' in exported and 'partition="1"' not in exported
    finally:
        await owner.redis.aclose()
