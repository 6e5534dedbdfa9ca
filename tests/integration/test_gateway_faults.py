"""The gateway under hostile input and failing dependencies, on the real stack (issues 11 and 12).

Tests that break something (Redis stopped, a model missing, a short-deadline client) either restore it
with readiness waits or run against a private gateway (tests/integration/gateways.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc

from tests.integration.gateways import health, metrics_text, private_gateway
from tests.integration.invariants import eventually
from vitrine.contracts import topics
from vitrine.contracts.events import Event, EventType
from vitrine.services.events.publisher import publish
from vitrine.services.features.store import FeatureStore
from vitrine.services.gateway.client import GatewayClient
from vitrine.services.gateway.experiment import Experiment, ExperimentStore, Variant
from vitrine.services.gateway.metrics import EXPERIMENT_REVISION, REQUESTS, REQUEST_DURATION
from vitrine.services.gateway.server import DEPENDENCY_HEALTH
from vitrine.services.stack import Stack
from vitrine.services.stack.components import settings_env
from vitrine.services.stack.launcher import free_port
from vitrine.settings import Settings, VariantSettings
from vitrine.v1 import recommender_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
STOREFRONT, EXPERIMENTER = "vitrine-demo-storefront", "vitrine-demo-experimenter"
HASTY_DEADLINE_S = 0.004
"""Short enough that Triton often misses it, long enough that the request reaches Triton from a Python client."""
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def _shoppers(stack: Stack, client: GatewayClient, count: int) -> list[str]:
    """Users with a history, so that their requests go to Triton; returns once the gateway ranks them with a model."""
    tag = uuid.uuid4().hex[:6]
    users = [f"fault-{tag}-{n}" for n in range(count)]
    now_ms = int(time.time() * 1000)
    await publish([Event(event_id=f"{u}-{k}", user_id=u, item_id=f"i{(n * 7 + k) % 300}", type=EventType.VIEW, ts_ms=now_ms + k)
                   for n, u in enumerate(users) for k in range(3)], stack.settings.kafka.bootstrap_servers, topics.EVENTS, retime=False)

    async def ranked() -> bool | None:
        replies = [await client.recommend(u, k=3, timeout_s=5) for u in users]
        return True if all(r.model_name in ("gru4rec", "sasrec") and not r.degraded for r in replies) else None

    await eventually(ranked, 30, "model answers for the test's shoppers")
    return users


# --- 12.1: a denied call cannot add a metric series ------------------------------------------------
async def test_calls_to_made_up_paths_leave_no_trace_in_the_metrics(stack: Stack) -> None:
    paths = [f"/x{uuid.uuid4().hex[:8]}.Svc/M{uuid.uuid4().hex[:8]}" for _ in range(20)]
    async with grpc.aio.insecure_channel(stack.settings.gateway.address) as channel:
        for path in paths:
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await channel.unary_unary(path)(b"", timeout=5)
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
    text = await metrics_text(stack.settings)
    assert not any(path.rsplit("/", 1)[1] in text for path in paths)
    methods = set(re.findall(rf'^{REQUESTS}{{[^}}]*method="([^"]+)"', text, flags=re.M))
    assert "unknown" in methods and methods <= {"Recommend", "RecommendBatch", "GetExperiment", "SetExperiment", "unknown"}


# --- 12.6: a body that does not decode --------------------------------------------------------------
async def test_a_malformed_body_gets_invalid_argument_and_one_log_line(stack: Stack) -> None:
    log = stack.supervisor.log_file("gateway")
    before = log.read_text(errors="replace") if log.exists() else ""
    garbage = b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"  # field 1, length varint that never ends
    async with grpc.aio.insecure_channel(stack.settings.gateway.address) as channel:
        for path, metadata in (("/vitrine.v1.Recommender/Recommend", (("authorization", f"Bearer {STOREFRONT}"),)),
                               ("/grpc.health.v1.Health/Check", ())):
            call = channel.unary_unary(path)
            for _ in range(30):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(garbage, timeout=5, metadata=metadata)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    async with GatewayClient(stack.settings.gateway.address, STOREFRONT) as client:
        assert (await client.recommend("still-serving", k=2)).items is not None
    added = (log.read_text(errors="replace") if log.exists() else "")[len(before):]
    assert "Traceback" not in added
    assert added.count("malformed") <= 2, added[-2000:]  # one line per method, then throttled


# --- 12.5, 12.8, 11.7: Redis down ------------------------------------------------------------------
async def test_redis_down_admin_calls_fail_fast_with_unavailable_and_health_says_which_dependency(stack: Stack) -> None:
    address = stack.settings.gateway.address
    await asyncio.to_thread(stack.supervisor.rpc_stop, "redis")
    try:
        async def redis_reported_down() -> bool | None:
            return True if await health(address, DEPENDENCY_HEALTH["redis"]) == NOT_SERVING else None

        async with GatewayClient(address, EXPERIMENTER) as admin:
            for call in (admin.get_experiment(), admin.set_experiment(pb.Experiment(
                    name="default", salt="vitrine", variants=[pb.Variant(name="control", model_name="gru4rec", weight=100)]))):
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "Redis" in refused.value.details()
                assert time.monotonic() - started < 3.0  # bounded by admin_timeout_ms (1 s), generously
        await eventually(redis_reported_down, 10, "the gateway to report Redis down")
        assert await health(address) == SERVING  # it still answers (degraded): a probe must not drain it
    finally:
        await stack.up(report=lambda line: None)

    async def redis_back() -> bool | None:
        return True if await health(address, DEPENDENCY_HEALTH["redis"]) == SERVING else None

    await eventually(redis_back, 30, "the gateway to report Redis up again")


# --- 11.7, 12.8, 12.9, 11.9: a private gateway -------------------------------------------------------
async def test_a_missing_model_is_reported_per_dependency_and_pub_sub_survives_a_redis_restart(stack: Stack) -> None:
    namespace = f"g{uuid.uuid4().hex[:8]}"
    missing = (VariantSettings(name="solo", model_name="no_such_model", weight=100),)
    async with private_gateway(stack.settings, namespace=namespace, default_variants=missing, experiment_poll_s=3600,
                               refresh_s=0.2) as settings:
        address = settings.gateway.address
        assert await health(address) == SERVING
        assert await health(address, DEPENDENCY_HEALTH["triton"]) == NOT_SERVING
        assert await health(address, DEPENDENCY_HEALTH["redis"]) == SERVING
        async with grpc.aio.insecure_channel(address) as channel:  # reflection is off unless asked for
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            # Nothing is written on the call: the server refuses the unknown method from its headers alone, and a
            # request message racing that refusal fails client-side as INTERNAL ("execute_batch"), not UNIMPLEMENTED.
            call = stub.ServerReflectionInfo(timeout=5)
            assert await call.code() == grpc.StatusCode.UNIMPLEMENTED

        await asyncio.to_thread(stack.supervisor.rpc_stop, "redis")
        await stack.up(report=lambda line: None)
        client = aioredis.Redis(host=stack.settings.redis.host, port=stack.settings.redis.port)
        try:
            store = ExperimentStore(client, namespace)
            stored = await store.save(Experiment(salt="vitrine", variants=(Variant(name="solo", model_name="gru4rec", weight=100),)),
                                      by="test")

            async def followed() -> bool | None:  # with a 1-hour poll, only the re-subscribed channel can bring it
                text = await metrics_text(settings)
                return True if re.search(rf"^{EXPERIMENT_REVISION} {stored.revision}\.0$", text, flags=re.M) else None

            await eventually(followed, 20, "the private gateway to follow the change over pub/sub after Redis restarted")

            async def triton_ready() -> bool | None:
                return True if await health(address, DEPENDENCY_HEALTH["triton"]) == SERVING else None

            await eventually(triton_ready, 20, "the dependency health to turn SERVING with a model that exists")
        finally:
            await client.delete(store.key, store.audit_key)
            await client.aclose()


def test_a_gateway_without_keys_refuses_to_start(stack: Stack) -> None:
    env = {**os.environ, **settings_env(stack.settings)}  # not the local stack's gateway: no demo keys
    done = subprocess.run([sys.executable, "-m", "vitrine", "gateway", "run"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no API keys" in done.stderr


async def test_concurrent_split_changes_with_the_same_revision_admit_exactly_one(stack: Stack) -> None:
    namespace = f"g{uuid.uuid4().hex[:8]}"
    async with private_gateway(stack.settings, namespace=namespace) as settings:
        async with GatewayClient(settings.gateway.address, EXPERIMENTER) as admin:
            current = await admin.get_experiment()
            proposals = [pb.Experiment(name="default", salt="vitrine", variants=[
                pb.Variant(name="control", model_name="gru4rec", weight=w), pb.Variant(name="treatment", model_name="sasrec", weight=100 - w)])
                for w in (10, 20, 30, 40, 60)]
            outcomes = await asyncio.gather(*(admin.set_experiment(p, expected_revision=current.revision) for p in proposals),
                                            return_exceptions=True)
        codes = Counter("OK" if isinstance(o, pb.Experiment) else o.code().name for o in outcomes)
        assert codes == Counter({"OK": 1, "ABORTED": 4}), outcomes
    client = aioredis.Redis(host=stack.settings.redis.host, port=stack.settings.redis.port)
    store = ExperimentStore(client, namespace)
    await client.delete(store.key, store.audit_key)
    await client.aclose()


# --- 12.3: one hasty client must not open the circuit for everybody ---------------------------------
async def test_a_client_with_2_ms_deadlines_does_not_degrade_a_patient_client(stack: Stack) -> None:
    async with GatewayClient(stack.settings.gateway.address, STOREFRONT) as client:
        users = await _shoppers(stack, client, 20)
        patient: Counter[str] = Counter()

        async def hasty_call(user: str) -> None:
            try:
                await client.recommend(user, k=5, timeout_s=HASTY_DEADLINE_S)
            except grpc.aio.AioRpcError:
                pass  # its own deadline: expected

        async def patient_call(user: str) -> None:
            reply = await client.recommend(user, k=5, timeout_s=1.0)
            patient[reply.degraded_reason or "model"] += 1

        async def at_rate(rate: float, call, seconds: float) -> None:  # noqa: ANN001
            tasks = []
            for n in range(int(rate * seconds)):
                tasks.append(asyncio.create_task(call(users[n % len(users)])))
                await asyncio.sleep(1 / rate)
            await asyncio.gather(*tasks)

        await asyncio.gather(at_rate(150, hasty_call, 4.0), at_rate(50, patient_call, 4.0))
    assert sum(patient.values()) == 200
    assert patient["circuit_open"] == 0, patient
    assert patient["model"] >= 190, patient  # a stray triton_timeout under a loaded 2-core machine is tolerated


# --- 12.11: state of variants and versions no longer served is freed --------------------------------
async def test_series_of_a_variant_that_left_the_experiment_disappear(stack: Stack) -> None:
    namespace = f"g{uuid.uuid4().hex[:8]}"
    async with private_gateway(stack.settings, namespace=namespace, refresh_s=0.2) as settings:
        async with GatewayClient(settings.gateway.address, STOREFRONT) as client:
            for n in range(40):
                await client.recommend(f"evict-{n}", k=2)
        text = await metrics_text(settings)
        assert re.search(rf'^{REQUEST_DURATION}_count{{[^}}]*variant="treatment"', text, flags=re.M)
        async with GatewayClient(settings.gateway.address, EXPERIMENTER) as admin:
            await admin.set_experiment(pb.Experiment(name="default", salt="vitrine",
                                                     variants=[pb.Variant(name="control", model_name="gru4rec", weight=100)]))

        async def forgotten() -> bool | None:
            text = await metrics_text(settings)
            return None if 'variant="treatment"' in text else True

        await eventually(forgotten, 20, "the treatment variant's series to be dropped")
    client = aioredis.Redis(host=stack.settings.redis.host, port=stack.settings.redis.port)
    store = ExperimentStore(client, namespace)
    await client.delete(store.key, store.audit_key)
    await client.aclose()


# --- issue 14.5: the transitions fallback --------------------------------------------------------------
FOLLOWERS_B, FOLLOWERS_C = 5, 2
"""Shoppers who stepped from item A to B, and from A to C: A's successor table must read B 5, C 2."""


async def _successor_table(stack: Stack) -> tuple[str, str, str]:
    """Items A, B, C of this test's own making, with A → B stepped by 5 shoppers and A → C by 2 (each step a
    run of events, which is one step); the same events are then sent again, as a producer retry or a replay
    would, and the table must not change: every replayed shopper ends with a new step B|C → Z, so once Z's
    predecessors show all of them the replay before it (same user, same partition) has been applied."""
    tag = uuid.uuid4().hex[:6]
    a, b, c, z = (f"tr-{tag}-{x}" for x in "abcz")
    now_ms = int(time.time() * 1000)
    events = []
    for n in range(FOLLOWERS_B + FOLLOWERS_C):
        user, after = f"tr-{tag}-u{n}", b if n < FOLLOWERS_B else c
        events += [Event(event_id=f"{user}-1", user_id=user, item_id=a, type=EventType.VIEW, ts_ms=now_ms + 1),
                   Event(event_id=f"{user}-2", user_id=user, item_id=a, type=EventType.CLICK, ts_ms=now_ms + 2),
                   Event(event_id=f"{user}-3", user_id=user, item_id=after, type=EventType.VIEW, ts_ms=now_ms + 3)]
    bootstrap = stack.settings.kafka.bootstrap_servers
    await publish(events, bootstrap, topics.EVENTS, retime=False)
    client = aioredis.Redis(host=stack.settings.redis.host, port=stack.settings.redis.port)
    store = FeatureStore(client, stack.settings.features)
    try:
        async def counted() -> dict[str, float] | None:
            table = dict(await store.successors(a, 10))
            return table if table == {b: FOLLOWERS_B, c: FOLLOWERS_C} else None

        await eventually(counted, 20, "A's successor table to count every shopper's step once")
        users = sorted({e.user_id for e in events})
        sentinels = [Event(event_id=f"{u}-4", user_id=u, item_id=z, type=EventType.VIEW, ts_ms=now_ms + 4) for u in users]
        await publish(events + sentinels, bootstrap, topics.EVENTS, retime=False)

        async def replay_applied() -> bool | None:
            into_z = 0.0
            for item in (b, c):
                into_z += dict(await store.successors(item, 10)).get(z, 0.0)
            return True if into_z == len(users) else None

        await eventually(replay_applied, 20, "the replayed events and the sentinels behind them")
        assert dict(await store.successors(a, 10)) == {b: FOLLOWERS_B, c: FOLLOWERS_C}  # exactly once
    finally:
        await client.aclose()
    return a, b, c


async def _shopper(stack: Stack, items: list[str]) -> str:
    user = f"tr-shopper-{uuid.uuid4().hex[:6]}"
    now_ms = int(time.time() * 1000)
    await publish([Event(event_id=f"{user}-{n}", user_id=user, item_id=item, type=EventType.VIEW, ts_ms=now_ms + n)
                   for n, item in enumerate(items)], stack.settings.kafka.bootstrap_servers, topics.EVENTS, retime=False)
    return user


def _dead_triton(stack: Stack) -> Settings:
    """The stack's settings with Triton's gRPC port pointing at a port nobody listens on."""
    return stack.settings.model_copy(update={"triton": stack.settings.triton.model_copy(update={"grpc_port": free_port()})})


async def test_with_triton_unreachable_a_shopper_after_a_gets_as_successors_first_marked_degraded_by_transitions(stack: Stack) -> None:
    a, b, c = await _successor_table(stack)
    user = await _shopper(stack, ["i297", "i1654", a])  # three steps: above transitions_max_history, so for the model
    async with private_gateway(_dead_triton(stack)) as settings, GatewayClient(settings.gateway.address, STOREFRONT) as client:
        async def features_read() -> pb.RecommendResponse | None:
            reply = await client.recommend(user, k=6, timeout_s=5)
            return reply if reply.model_name == "transitions" and reply.degraded else None

        first = await eventually(features_read, 20, "the degraded transitions answer")
        replies = [first] + [await client.recommend(user, k=6, timeout_s=5) for _ in range(10)]
        for reply in replies:
            items = [i.item_id for i in reply.items]
            assert reply.degraded and reply.model_name == "transitions", (reply.model_name, reply.degraded_reason)
            assert reply.degraded_reason in {"triton_unavailable", "triton_timeout", "circuit_open"}
            assert items[:2] == [b, c] and len(items) == 6 and len(set(items)) == 6 and a not in items
        text = await metrics_text(settings)
        assert re.search(r'vitrine_gateway_degraded_total\{[^}]*source="transitions"[^}]*\} [1-9]', text)


async def test_a_shopper_with_one_step_gets_the_transitions_answer_without_the_model_and_not_degraded(stack: Stack) -> None:
    a, b, c = await _successor_table(stack)
    user = await _shopper(stack, [a])
    # Triton unreachable: an answer that needed the model would be degraded.
    async with private_gateway(_dead_triton(stack), transitions_max_history=1) as settings, \
            GatewayClient(settings.gateway.address, STOREFRONT) as client:
        async def features_read() -> pb.RecommendResponse | None:
            reply = await client.recommend(user, k=4, timeout_s=5)
            return reply if reply.model_name != "trending" else None  # trending: the step not yet in Redis

        reply = await eventually(features_read, 20, "the shopper's step in the gateway's features")
        assert not reply.degraded and reply.model_name == "transitions", (reply.model_name, reply.degraded_reason)
        items = [i.item_id for i in reply.items]
        assert items[:2] == [b, c] and len(items) == 4 and len(set(items)) == 4 and a not in items
        text = await metrics_text(settings)
        assert re.search(r'vitrine_gateway_answers_total\{[^}]*source="transitions"[^}]*\} [1-9]', text)
        assert "vitrine_gateway_degraded_total{" not in text


# --- issue 20, item 7: exposures across a Kafka restart ---------------------------------------------------------
def _exposure_counts(text: str) -> dict[str, float]:
    """answers, sent, dropped (all reasons) and buffered from a gateway's /metrics."""
    wanted = {"vitrine_gateway_answers_total": "answered", "vitrine_gateway_exposures_sent_total": "sent",
              "vitrine_gateway_exposures_dropped_total": "dropped", "vitrine_gateway_exposures_buffered_records": "buffered"}
    counts = dict.fromkeys(wanted.values(), 0.0)
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in wanted:
            counts[wanted[name]] += float(line.rsplit(" ", 1)[1])
    return counts


@pytest.mark.timeout(180)
async def test_answers_during_a_kafka_restart_are_sent_or_counted_answered_equals_sent_plus_dropped_plus_buffered(stack: Stack) -> None:
    """A private gateway answers steadily while the stack's Kafka is stopped and started again. Its exposure sender
    holds the batch Kafka did not acknowledge and sends it after the restart: at the end every answer is in
    `recs.served` (by request id), nothing is dropped, and the gateway's own counters say answered = sent + dropped +
    buffered — during the outage too."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    tag = uuid.uuid4().hex[:8]
    reader = AIOKafkaConsumer(bootstrap_servers=stack.settings.kafka.bootstrap_servers)
    await reader.start()
    partitions = [TopicPartition(topics.RECS_SERVED, p) for p in range(stack.settings.kafka.partitions)]
    reader.assign(partitions)
    await reader.seek_to_end(*partitions)
    for tp in partitions:
        await reader.position(tp)  # pinned before the first answer
    answered: list[str] = []
    try:
        async with private_gateway(stack.settings, exposure_send_timeout_ms=1000) as settings, \
                GatewayClient(settings.gateway.address, STOREFRONT) as client:
            async def ask(n: int) -> None:
                for _ in range(n):
                    request_id = f"kr-{tag}-{len(answered)}"
                    # A generous deadline: on 2 cores a stopping broker (a JVM) can slow everything for a moment.
                    await client.recommend(f"kafka-restart-{tag}-{len(answered) % 13}", k=3, request_id=request_id, timeout_s=10)
                    answered.append(request_id)

            async def settled() -> dict[str, float]:
                """Counts from two identical scrapes in a row: the scrape thread may read between two updates of one step."""
                previous = None
                while (counts := _exposure_counts(await metrics_text(settings))) != previous:
                    previous = counts
                assert counts["answered"] == counts["sent"] + counts["dropped"] + counts["buffered"], counts
                return counts

            async def held() -> dict[str, float] | None:
                await ask(5)
                counts = await settled()
                return counts if counts["buffered"] >= 20 else None

            await ask(20)
            await asyncio.to_thread(stack.supervisor.rpc_stop, "kafka")
            try:
                during = await eventually(held, 60, "answers held while Kafka is away", interval_s=0.05)
                assert during["answered"] == len(answered)
            finally:
                await stack.up(report=lambda line: None)
            await ask(20)

            async def all_sent() -> dict[str, float] | None:
                counts = await settled()
                return counts if counts["buffered"] == 0 else None

            final = await eventually(all_sent, 60, "the held exposures to be sent after the restart", interval_s=0.1)
            assert final == {"answered": len(answered), "sent": len(answered), "dropped": 0, "buffered": 0}
        found: set[str] = set()

        async def in_topic() -> bool | None:
            for messages in (await reader.getmany(timeout_ms=500)).values():
                found.update(rid for m in messages if (rid := json.loads(m.value)["request_id"]).startswith(f"kr-{tag}-"))
            return True if found >= set(answered) else None

        await eventually(in_topic, 30, f"{len(answered)} exposures in {topics.RECS_SERVED}", interval_s=0)
        assert found == set(answered)
    finally:
        await reader.stop()
