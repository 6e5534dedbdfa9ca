"""The gateway in the real stack: live features, A/B routing, auth, validation, exposures, degradation."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter

import grpc
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.invariants import eventually
from vitrine.contracts import topics
from vitrine.contracts.events import Event, EventType
from vitrine.services.events.publisher import publish
from vitrine.services.gateway.client import GatewayClient
from vitrine.services.gateway.experiment import ExperimentStore
from vitrine.services.stack import Stack
from vitrine.v1 import recommender_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
STOREFRONT, EXPERIMENTER, ADMIN = "vitrine-demo-storefront", "vitrine-demo-experimenter", "vitrine-demo-admin"


@pytest.fixture
async def storefront(stack: Stack):
    async with GatewayClient(stack.settings.gateway.address, STOREFRONT) as client:
        yield client


@pytest.fixture
async def experimenter(stack: Stack):
    async with GatewayClient(stack.settings.gateway.address, EXPERIMENTER) as client:
        yield client
        # Leave the split as the other tests expect it.
        await client.set_experiment(_split(50, 50))


@pytest.fixture
async def popular(stack: Stack, storefront: GatewayClient) -> list[str]:
    """Items with popularity of this test's own making, so that cold-start answers are never empty
    whatever ran before (or nothing did): the gateway's trending copy holds them once this returns."""
    items = [f"pop-{uuid.uuid4().hex[:6]}-{n}" for n in range(12)]
    now_ms = int(time.time() * 1000)
    await publish([Event(event_id=f"{item}-{k}", user_id=f"popular-maker-{k}", item_id=item, type=EventType.PURCHASE, ts_ms=now_ms)
                   for item in items for k in range(50)], stack.settings.kafka.bootstrap_servers, topics.EVENTS, retime=False)

    async def trending_filled() -> bool | None:
        reply = await storefront.recommend(f"cold-{uuid.uuid4().hex[:6]}", k=10)
        return True if len(reply.items) == 10 else None

    await eventually(trending_filled, 20, "a full cold-start answer from the gateway's trending copy")
    return items


def _split(control: int, treatment: int, salt: str = "vitrine") -> pb.Experiment:
    return pb.Experiment(name="default", salt=salt, variants=[
        pb.Variant(name="control", model_name="gru4rec", weight=control),
        pb.Variant(name="treatment", model_name="sasrec", weight=treatment),
    ])


async def _batch(client: GatewayClient, users: list[str], k: int = 3) -> list[pb.RecommendResponse]:
    replies = []
    for start in range(0, len(users), 64):
        request = pb.RecommendBatchRequest(requests=[pb.RecommendRequest(user_id=u, k=k) for u in users[start:start + 64]])
        replies += (await client.recommender.RecommendBatch(request, timeout=10, metadata=client.metadata)).responses
    return replies


async def test_recommendations_follow_the_shoppers_live_events(stack: Stack, storefront: GatewayClient, popular: list[str]) -> None:
    user = f"shopper-{uuid.uuid4().hex[:8]}"
    cold = await storefront.recommend(user, k=10)
    assert cold.model_name == "trending" and not cold.degraded and len(cold.items) == 10
    now_ms = int(time.time() * 1000)
    viewed = ["i367", "i1656", "i297", "i1654"]
    events = [Event(event_id=f"{user}-{i}", user_id=user, item_id=item, type=EventType.VIEW, ts_ms=now_ms + i)
              for i, item in enumerate(viewed)]
    await publish(events, stack.settings.kafka.bootstrap_servers, topics.EVENTS, retime=False)
    sent = time.monotonic()

    async def personalised() -> pb.RecommendResponse | None:
        reply = await storefront.recommend(user, k=10)
        return reply if reply.model_name in ("gru4rec", "sasrec") else None

    # Freshness itself (p99 of tens of ms) is measured by `vitrine bench features`; here only a generous bound
    # on a 2-core machine shared with Kafka and Triton.
    warm = await eventually(personalised, 10, "recommendations from the user's new history", interval_s=0.02)
    assert [i.item_id for i in warm.items] != [i.item_id for i in cold.items]
    assert warm.variant == cold.variant  # same user, same variant
    # A purchase removes the item from what is recommended.
    bought = warm.items[0].item_id
    await publish([Event(event_id=f"{user}-buy", user_id=user, item_id=bought, type=EventType.PURCHASE, ts_ms=now_ms + 10)],
                  stack.settings.kafka.bootstrap_servers, topics.EVENTS, retime=False)

    async def without_purchase() -> bool | None:
        reply = await storefront.recommend(user, k=10)
        return True if bought not in [i.item_id for i in reply.items] else None

    await eventually(without_purchase, 5, "the purchased item to disappear from the recommendations", interval_s=0.02)


async def test_a_70_30_split_over_10000_users_is_accurate_and_sticky(experimenter: GatewayClient, storefront: GatewayClient) -> None:
    stored = await experimenter.set_experiment(_split(70, 30, salt=f"s-{uuid.uuid4().hex[:6]}"))
    assert [v.weight for v in stored.variants] == [70, 30] and stored.updated_by == "demo-experimenter"
    users = [f"ab-{i}" for i in range(10_000)]
    first = await _batch(storefront, users, k=1)
    shares = Counter(r.variant for r in first)
    assert abs(shares["control"] / len(users) - 0.70) <= 0.02 and abs(shares["treatment"] / len(users) - 0.30) <= 0.02
    again = await _batch(storefront, users[:1000], k=1)
    assert [r.variant for r in again] == [r.variant for r in first[:1000]]
    # Moving 10 points moves only users from control to treatment, about 10 % of them.
    await experimenter.set_experiment(_split(60, 40, salt=stored.salt))
    moved = await _batch(storefront, users[:2000], k=1)
    changes = Counter((a.variant, b.variant) for a, b in zip(first[:2000], moved, strict=True) if a.variant != b.variant)
    assert set(changes) == {("control", "treatment")} and 0.07 <= changes[("control", "treatment")] / 2000 <= 0.13


async def test_a_split_change_reaches_a_running_gateway_within_a_second(stack: Stack, experimenter: GatewayClient, storefront: GatewayClient) -> None:
    client = aioredis.Redis(host=stack.settings.redis.host, port=stack.settings.redis.port)
    store = ExperimentStore(client, stack.settings.features.namespace)
    current = await store.load()
    assert current is not None
    users = [f"push-{i}" for i in range(64)]
    # Another gateway (or an operator) writes the experiment; this gateway learns it over pub/sub.
    await store.save(current.model_copy(update={"variants": tuple(v.model_copy(update={"weight": 100 if v.name == "treatment" else 0}) for v in current.variants)}), by="test")

    async def all_treatment() -> bool | None:
        return True if {r.variant for r in await _batch(storefront, users, k=1)} == {"treatment"} else None

    # Under the 5 s periodic re-read (experiment_poll_s): only pub/sub can be this quick; generous for a loaded machine.
    await eventually(all_treatment, 4, "the gateway to serve the new split over pub/sub", interval_s=0.02)
    await client.aclose()


async def test_experiment_changes_are_validated(experimenter: GatewayClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await experimenter.set_experiment(_split(60, 30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sum to 100" in error.value.details()
    missing = pb.Experiment(salt="x", variants=[pb.Variant(name="a", model_name="no_such_model", weight=100)])
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await experimenter.set_experiment(missing)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no_such_model" in error.value.details()
    current = await experimenter.get_experiment()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await experimenter.set_experiment(_split(50, 50), expected_revision=current.revision - 1)
    assert error.value.code() == grpc.StatusCode.ABORTED
    # A name the outcome store could not key on (the unit separator, a space) is refused where it enters.
    for bad_name in ("spring\x1fsale", "spring sale", "-x", "x" * 65):
        named = _split(50, 50)
        named.name = bad_name
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await experimenter.set_experiment(named)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "name" in error.value.details(), bad_name
    assert (await experimenter.get_experiment()).revision == current.revision  # nothing stored, the gateway still answers


async def test_every_answer_is_logged_to_kafka(stack: Stack, storefront: GatewayClient) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.settings.kafka.bootstrap_servers)
    await consumer.start()
    try:
        # Pin the end of every partition before asking: no settling by a timed poll.
        partitions = [TopicPartition(topics.RECS_SERVED, p) for p in range(stack.settings.kafka.partitions)]  # as `stack up` made it
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        for tp in partitions:
            await consumer.position(tp)
        ids = {f"req-{uuid.uuid4().hex}" for _ in range(5)}
        for request_id in ids:
            reply = await storefront.recommend("exposed-user", k=4, request_id=request_id, page="home")
            assert reply.request_id == request_id
        found = {}
        deadline = time.monotonic() + 15
        while len(found) < len(ids) and time.monotonic() < deadline:
            for message in (m for ms in (await consumer.getmany(timeout_ms=500)).values() for m in ms):
                record = json.loads(message.value)
                if record["request_id"] in ids:
                    found[record["request_id"]] = record
        assert found.keys() == ids
        record = next(iter(found.values()))
        assert record["user_id"] == "exposed-user" and record["page"] == "home" and len(record["item_ids"]) == 4
        assert record["variant"] in ("control", "treatment") and record["latency_ms"] > 0
    finally:
        await consumer.stop()


@pytest.mark.parametrize(
    ("key", "call", "code"),
    [
        (None, "recommend", grpc.StatusCode.UNAUTHENTICATED),
        ("not-a-key", "recommend", grpc.StatusCode.UNAUTHENTICATED),
        (EXPERIMENTER, "recommend", grpc.StatusCode.PERMISSION_DENIED),
        (STOREFRONT, "experiment", grpc.StatusCode.PERMISSION_DENIED),
        (ADMIN, "recommend", grpc.StatusCode.OK),
        (ADMIN, "experiment", grpc.StatusCode.OK),
        (EXPERIMENTER, "experiment", grpc.StatusCode.OK),
    ],
)
async def test_auth(stack: Stack, key: str | None, call: str, code: grpc.StatusCode) -> None:
    async with GatewayClient(stack.settings.gateway.address, key) as client:
        try:
            await (client.recommend("auth-user") if call == "recommend" else client.get_experiment())
            got = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            got = exc.code()
    assert got == code


async def test_health_needs_no_key_and_reports_serving(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.settings.gateway.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="vitrine.v1.Recommender"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"user_id": "", "k": 5}, "user_id"),
        ({"user_id": "x" * 129, "k": 5}, "user_id"),
        ({"user_id": "u 1", "k": 5}, "user_id"),
        ({"user_id": "u1", "k": 0}, "k must lie in 1..50"),
        ({"user_id": "u1", "k": 51}, "k must lie in 1..50"),
        ({"user_id": "u1", "k": 5, "exclude_item_ids": [f"i{n}" for n in range(101)]}, "at most 100"),
        ({"user_id": "u1", "k": 5, "exclude_item_ids": ["ok", "not ok"]}, "exclude_item_ids"),
        ({"user_id": "u1", "k": 5, "context": pb.Context(page="p" * 65)}, "context.page"),
        ({"user_id": "u1", "k": 5, "context": pb.Context(item_id="bad item")}, "context.item_id"),
        ({"user_id": "u1", "k": 5, "request_id": "r" * 129}, "request_id"),
    ],
)
async def test_invalid_requests_are_rejected_with_what_is_wrong(storefront: GatewayClient, popular: list[str], request_fields: dict,
                                                              message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await storefront.recommender.Recommend(pb.RecommendRequest(**request_fields), timeout=5, metadata=storefront.metadata)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details()
    assert (await storefront.recommend("still-serving")).items  # the gateway keeps serving


async def test_triton_down_degrades_without_errors_and_recovers(stack: Stack, storefront: GatewayClient) -> None:
    user = f"deg-{uuid.uuid4().hex[:6]}"
    now_ms = int(time.time() * 1000)
    # Three steps: shoppers with at most gateway.transitions_max_history (2) steps are not sent to the model.
    await publish([Event(event_id=f"{user}-{n}", user_id=user, item_id=item, type=EventType.CLICK, ts_ms=now_ms + n)
                   for n, item in enumerate(("i297", "i1654", "i367"))], stack.settings.kafka.bootstrap_servers, topics.EVENTS, retime=False)

    async def personalised() -> bool | None:
        return True if (await storefront.recommend(user)).model_name in ("gru4rec", "sasrec") else None

    await eventually(personalised, 10, "a model answer before the failure")
    await asyncio.to_thread(stack.supervisor.rpc_stop, "triton")
    try:
        replies = [await storefront.recommend(user, k=5) for _ in range(30)]
        # The fallback after the model: the successors of i367 (other tests' shoppers stepped from it), else popularity.
        assert all(r.degraded and r.model_name in ("transitions", "popularity") and len(r.items) == 5 for r in replies)
        reasons = Counter(r.degraded_reason for r in replies)
        assert set(reasons) <= {"triton_unavailable", "triton_timeout", "circuit_open"} and "circuit_open" in reasons
    finally:
        await stack.up(report=lambda line: None)
    await eventually(personalised, 30, "model answers after Triton is back")


async def test_redis_down_degrades_to_the_in_memory_copy(stack: Stack, storefront: GatewayClient) -> None:
    now_ms = int(time.time() * 1000)
    await publish([Event(event_id=f"pop-{uuid.uuid4().hex}", user_id="popular-maker", item_id=f"i{n}", type=EventType.VIEW, ts_ms=now_ms)
                   for n in range(10)], stack.settings.kafka.bootstrap_servers, topics.EVENTS, retime=False)

    async def copy_filled() -> bool | None:  # the cold-start answer comes from the gateway's in-memory copy
        return True if len((await storefront.recommend(f"cold-{uuid.uuid4().hex[:6]}", k=5)).items) == 5 else None

    await eventually(copy_filled, 10, "the gateway's in-memory popularity copy")
    await asyncio.to_thread(stack.supervisor.rpc_stop, "redis")
    try:
        replies = [await storefront.recommend(f"r-{i}", k=5) for i in range(10)]
        assert all(r.degraded and "redis_unavailable" in r.degraded_reason and len(r.items) == 5 for r in replies)
    finally:
        await stack.up(report=lambda line: None)

    async def recovered() -> bool | None:
        return True if not (await storefront.recommend("r-0")).degraded else None

    await eventually(recovered, 30, "normal answers once Redis is back")
