"""The gateway's failure paths, without services: the request path of `RecommenderService` with its real
micro-batcher, circuit breaker, fallback and metrics, in front of stand-ins for Redis and Triton whose
timing each test controls (events, not sleeps, decide what is in flight when).

Real Redis and Triton failures are exercised on the real stack in tests/integration/test_gateway_faults.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from tritonclient.utils import InferenceServerException

from vitrine.contracts import ranker
from vitrine.contracts.events import EventType
from vitrine.services.features.store import RecentEvent, UserFeatures
from vitrine.services.gateway.batcher import DeadlineExpired, MicroBatcher
from vitrine.services.gateway.breaker import BreakerState, CircuitBreaker, CircuitOpen
from vitrine.services.gateway.drift import DriftMonitor
from vitrine.services.gateway.experiment import Experiment, Variant
from vitrine.services.gateway.fallback import PopularityFallback
from vitrine.services.gateway.metrics import GatewayMetrics, label_sets
from vitrine.services.gateway.ranking import ModelCatalog, RankerPool, ServedModel
from vitrine.services.gateway.service import RecommenderService
from vitrine.settings import GatewaySettings
from vitrine.v1 import recommender_pb2 as pb

pytestmark = pytest.mark.timeout(20)
ITEMS = tuple(f"i{n}" for n in range(8))
POPULAR = [(f"p{n}", float(100 - n)) for n in range(20)]


# --- stand-ins for the servers ------------------------------------------------------------------
class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class Context:
    """The parts of grpc.aio.ServicerContext the service uses; abort raises, as grpc's does."""

    def __init__(self, remaining_s: float | None = None) -> None:
        self.remaining_s = remaining_s
        self.created = time.monotonic()

    def time_remaining(self) -> float | None:
        return None if self.remaining_s is None else self.remaining_s - (time.monotonic() - self.created)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


class Store:
    """Features and popularity as Redis would give them; `delay_s` makes the feature read slow."""

    def __init__(self, delay_s: float = 0.0, successors: dict[str, list[tuple[str, float]]] | None = None) -> None:
        self.delay_s = delay_s
        self.next = successors or {}

    async def user_features(self, user_id: str, now_ms: int) -> UserFeatures:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        recent = (RecentEvent("i1", EventType.VIEW, now_ms - 1000, "e1"), RecentEvent("i2", EventType.CLICK, now_ms, "e2"))
        return UserFeatures(user_id, recent, {}, frozenset())

    async def popular(self, n: int) -> list[tuple[str, float]]:
        return POPULAR[:n]

    async def trending(self, n: int, now_ms: int) -> list[tuple[str, float]]:
        return POPULAR[:n]

    async def successors(self, item_id: str, n: int) -> list[tuple[str, float]]:
        return self.next.get(item_id, [])[:n]

    async def successors_and_popular(self, item_id: str, n: int, n_popular: int) -> tuple[list, list]:
        return self.next.get(item_id, [])[:n], POPULAR[:n_popular]


class Triton:
    """`infer` as tritonclient's aio client behaves: it raises DEADLINE_EXCEEDED when `client_timeout`
    passes before the answer; `hold` keeps calls in flight until set; `down` fails them as UNAVAILABLE."""

    def __init__(self, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s
        self.hold = asyncio.Event()
        self.hold.set()
        self.down = False
        self.timeouts: list[float] = []
        self.batch_sizes: list[int] = []
        self.started = asyncio.Event()

    async def infer(self, model_name, inputs, model_version, outputs, client_timeout):  # noqa: ANN001, ANN201
        self.timeouts.append(client_timeout)
        batch = inputs[0].shape()[0]
        self.batch_sizes.append(batch)
        self.started.set()

        async def answer():  # noqa: ANN202
            await self.hold.wait()
            await asyncio.sleep(self.latency_s)
            if self.down:
                raise InferenceServerException("failed to connect to all addresses", status="StatusCode.UNAVAILABLE")
            return _Result(batch)

        try:
            return await asyncio.wait_for(answer(), client_timeout)
        except TimeoutError:
            raise InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED") from None


class _Result:
    def __init__(self, batch: int) -> None:
        self.batch = batch

    def as_numpy(self, name: str) -> np.ndarray:
        if name == ranker.TOP_IDS:
            return np.tile(np.arange(2, 6, dtype=np.int64), (self.batch, 1))
        return np.tile(np.array([4.0, 3.0, 2.0, 1.0], dtype=np.float32), (self.batch, 1))


class Catalog:
    def __init__(self) -> None:
        self.model = ServedModel("gru4rec", "1", max_len=5, max_k=4, item_ids=ITEMS, first_item_id=2,
                                 index={item: n + 2 for n, item in enumerate(ITEMS)})

    async def resolve(self, name: str, version: str) -> ServedModel:
        return self.model


class Exposures:
    def __init__(self) -> None:
        self.records: list = []

    def record(self, exposure) -> None:  # noqa: ANN001
        self.records.append(exposure)


class Follower:
    current = Experiment(salt="s", variants=(Variant(name="control", model_name="gru4rec", weight=100),))


def gateway(triton: Triton, store: Store | None = None, **overrides: object) -> tuple[RecommenderService, Exposures, GatewayMetrics]:
    settings = GatewaySettings(**{"max_delay_ms": 5.0, "breaker_reset_s": 60.0, **overrides})
    metrics = GatewayMetrics(CollectorRegistry())
    store = store or Store()
    fallback = PopularityFallback(store, depth=50, refresh_s=1.0, redis_timeout_s=settings.redis_timeout_ms / 1000)  # type: ignore[arg-type]
    exposures = Exposures()
    service = RecommenderService(settings, store, Follower(), Catalog(), RankerPool(settings, triton, metrics),  # type: ignore[arg-type]
                                 fallback, exposures, metrics, DriftMonitor(metrics, 100, 60.0, 100))  # type: ignore[arg-type]
    return service, exposures, metrics


def request(user: str = "u1", k: int = 3) -> pb.RecommendRequest:
    return pb.RecommendRequest(user_id=user, k=k)


# --- deadlines (issue 11.4, 12.3) ------------------------------------------------------------------
async def test_a_deadline_that_passes_gets_deadline_exceeded() -> None:
    service, exposures, _ = gateway(Triton(), Store(delay_s=0.05), redis_timeout_ms=1000)
    with pytest.raises(Aborted) as aborted:
        await service.Recommend(request(), Context(remaining_s=0.01))
    assert aborted.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert exposures.records == []  # nothing was delivered, so nothing is logged as shown


async def test_a_slow_redis_is_cut_at_its_budget_and_the_answer_degrades() -> None:
    service, _, _ = gateway(Triton(), Store(delay_s=5.0), redis_timeout_ms=20)
    reply = await service.Recommend(request(), Context(remaining_s=2.0))
    assert reply.degraded and reply.degraded_reason == "redis_unavailable" and reply.model_name == "popularity"


async def test_one_clients_short_deadline_does_not_cut_the_batch_short_for_the_others() -> None:
    triton = Triton(latency_s=0.02)
    service, _, _ = gateway(triton, max_inflight_batches=1)
    triton.hold.clear()
    first = asyncio.create_task(service.Recommend(request("a"), Context(remaining_s=5.0)))  # idle: in flight, held
    await triton.started.wait()
    hasty = asyncio.create_task(service.Recommend(request("b"), Context(remaining_s=0.005)))
    patient = asyncio.create_task(service.Recommend(request("c"), Context(remaining_s=5.0)))
    await asyncio.sleep(0.01)  # the hasty caller's deadline passes while both wait behind the held batch
    triton.hold.set()
    assert not (await first).degraded
    with pytest.raises(Aborted) as aborted:
        await hasty
    assert aborted.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    reply = await patient
    assert not reply.degraded, reply.degraded_reason
    assert triton.batch_sizes == [1, 1]  # the expired request was not sent at all
    assert triton.timeouts[1] > 1.0 * 0.2  # the patient caller's budget (capped at triton_timeout_ms), not 5 ms


async def test_short_client_deadlines_never_open_the_circuit_for_everybody() -> None:
    triton = Triton(latency_s=0.03)
    service, _, metrics = gateway(triton, breaker_threshold=3)
    for n in range(10):  # each times out at Triton on its client's 5 ms deadline
        try:
            reply = await service.Recommend(request(f"hasty-{n}"), Context(remaining_s=0.005))
            assert reply.degraded  # answered just inside the deadline: degraded, never a model answer
        except Aborted as aborted:
            assert aborted.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert service.rankers.breaker("gru4rec").state is BreakerState.CLOSED
    reply = await service.Recommend(request("patient"), Context(remaining_s=5.0))
    assert not reply.degraded, reply.degraded_reason


async def test_a_caller_that_leaves_during_the_call_does_not_count_against_triton() -> None:
    triton = Triton()
    service, _, _ = gateway(triton, breaker_threshold=1)
    triton.hold.clear()
    call = asyncio.create_task(service.Recommend(request(), Context(remaining_s=5.0)))
    await triton.started.wait()
    call.cancel()  # what grpc does when the storefront disconnects
    with pytest.raises(asyncio.CancelledError):
        await call
    assert service.rankers.breaker("gru4rec").state is BreakerState.CLOSED


async def test_triton_failing_opens_the_circuit_and_answers_degrade() -> None:
    triton = Triton()
    triton.down = True
    service, _, metrics = gateway(triton, breaker_threshold=3)
    reasons = [(await service.Recommend(request(f"u{n}"), Context(5.0))).degraded_reason for n in range(6)]
    assert reasons == ["triton_unavailable"] * 3 + ["circuit_open"] * 3
    assert len(triton.timeouts) == 3  # an open circuit makes no call
    assert metrics.breaker_state.labels("gru4rec")._value.get() == BreakerState.OPEN


# --- the breaker itself ---------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_half_open_admits_only_the_trial_calls_and_one_verdict_decides() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=2, reset_s=10, probes=2, clock=clock)
    for _ in range(2):
        with breaker.call() as call:
            call.failure()
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen):
        breaker.call()
    clock.now = 11
    trial_one, trial_two = breaker.call(), breaker.call()
    assert breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpen):  # the third caller while two trials are under way
        breaker.call()
    with trial_one:
        pass  # neutral (e.g. the client left): frees its slot, decides nothing
    assert breaker.state is BreakerState.HALF_OPEN
    with breaker.call() as call:
        call.failure()  # a trial failing re-opens at once
    assert breaker.state is BreakerState.OPEN
    with trial_two as call:
        call.success()  # a late success of an older trial closes it
    assert breaker.state is BreakerState.CLOSED and breaker.failures == 0


def test_neutral_outcomes_neither_count_nor_reset() -> None:
    breaker = CircuitBreaker(threshold=3, reset_s=10, probes=1, clock=Clock())
    for outcome in ("failure", "neutral", "failure", "neutral", "failure"):
        with breaker.call() as call:
            if outcome == "failure":
                call.failure()
    assert breaker.state is BreakerState.OPEN


# --- load shedding (issue 11.5) --------------------------------------------------------------------
@pytest.mark.parametrize("shed_mode", ["fallback", "reject"])
async def test_a_full_queue_sheds_with_the_configured_answer(shed_mode: str) -> None:
    triton = Triton()
    service, _, metrics = gateway(triton, max_batch=1, queue_size=1, max_inflight_batches=1, shed_mode=shed_mode)
    triton.hold.clear()
    first = asyncio.create_task(service.Recommend(request("u0"), Context(5.0)))
    await triton.started.wait()
    calls = [asyncio.create_task(service.Recommend(request(f"u{n}"), Context(5.0))) for n in range(1, 8)]
    await asyncio.sleep(0.01)
    triton.hold.set()
    outcomes = await asyncio.gather(first, *calls, return_exceptions=True)
    shed = [o for o in outcomes if isinstance(o, Aborted) or (isinstance(o, pb.RecommendResponse) and o.degraded)]
    assert len(shed) >= 4  # one in flight, one taken for the next batch, one queued: the rest are shed
    if shed_mode == "fallback":
        assert all(o.degraded_reason == "overloaded" and o.model_name == "popularity" and len(o.items) == 3 for o in shed)
    else:
        assert all(isinstance(o, Aborted) and o.code is grpc.StatusCode.RESOURCE_EXHAUSTED for o in shed)
    assert not any(isinstance(o, pb.RecommendResponse) and o.degraded and o not in shed for o in outcomes)


# --- batcher cancellation and shutdown (issue 11.6) ------------------------------------------------
async def test_callers_that_gave_up_are_skipped_and_stop_cancels_the_queued() -> None:
    sizes: list[int] = []
    release = asyncio.Event()

    async def infer(rows, timeout):  # noqa: ANN001, ANN202
        sizes.append(len(rows))
        await release.wait()
        return list(rows)

    batcher: MicroBatcher[int, int] = MicroBatcher(infer, max_batch=8, max_delay_s=0.001, queue_size=100, max_inflight=1)
    batcher.start()
    first = asyncio.create_task(batcher.submit(0))
    while not sizes:
        await asyncio.sleep(0)
    leaving = [asyncio.create_task(batcher.submit(n)) for n in (1, 2)]
    staying = asyncio.create_task(batcher.submit(3))
    expiring = asyncio.create_task(batcher.submit(4, deadline=time.perf_counter() + 0.002))
    await asyncio.sleep(0.01)
    for task in leaving:
        task.cancel()
    with pytest.raises(DeadlineExpired):
        await expiring
    release.set()
    assert await first == 0 and await staying == 3
    assert sizes == [1, 1]  # the two that left and the one that expired were never sent
    release.clear()
    in_flight = asyncio.create_task(batcher.submit(5))
    while len(sizes) < 3:
        await asyncio.sleep(0)
    queued = [asyncio.create_task(batcher.submit(n)) for n in (6, 7)]
    await asyncio.sleep(0)
    stopping = asyncio.create_task(batcher.stop())
    await asyncio.sleep(0.01)
    release.set()  # the batch in flight finishes; the queued are cancelled
    await stopping
    assert await in_flight == 5
    for task in queued:
        with pytest.raises(asyncio.CancelledError):
            await task


# --- RecommendBatch: all or nothing (issue 12.10, 11.9) ---------------------------------------------
@pytest.mark.parametrize("count", [0, 65])
async def test_batch_size_bounds(count: int) -> None:
    service, exposures, _ = gateway(Triton())
    with pytest.raises(Aborted) as aborted:
        await service.RecommendBatch(pb.RecommendBatchRequest(requests=[request(f"u{n}") for n in range(count)]), Context(5.0))
    assert aborted.value.code is grpc.StatusCode.INVALID_ARGUMENT and "1..64" in aborted.value.details


async def test_one_invalid_sub_request_answers_none_and_logs_no_exposure() -> None:
    service, exposures, _ = gateway(Triton())
    requests = [request("u1"), request("u2"), pb.RecommendRequest(user_id="bad user", k=3)]
    with pytest.raises(Aborted) as aborted:
        await service.RecommendBatch(pb.RecommendBatchRequest(requests=requests), Context(5.0))
    assert aborted.value.code is grpc.StatusCode.INVALID_ARGUMENT and "requests[2]" in aborted.value.details
    assert exposures.records == []


async def test_a_sub_request_that_cannot_be_answered_fails_the_batch_with_no_exposure() -> None:
    triton = Triton()
    service, exposures, _ = gateway(triton, max_batch=1, queue_size=1, max_inflight_batches=1, shed_mode="reject")
    triton.hold.clear()
    batch = asyncio.create_task(service.RecommendBatch(
        pb.RecommendBatchRequest(requests=[request(f"u{n}") for n in range(6)]), Context(5.0)))
    await triton.started.wait()
    await asyncio.sleep(0.01)
    triton.hold.set()
    with pytest.raises(Aborted) as aborted:
        await batch
    assert aborted.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert exposures.records == []  # the answers computed for the others were never delivered
    ok = await service.RecommendBatch(pb.RecommendBatchRequest(requests=[request("u1"), request("u2")]), Context(5.0))
    assert len(ok.responses) == 2 and len(exposures.records) == 2


# --- the model catalogue (issue 12.4, 11.9) --------------------------------------------------------
class Repository:
    """Triton's model metadata and readiness, as the aio client answers them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.versions = ["1"]
        self.unreachable = False
        self.hang = asyncio.Event()
        self.hang.set()
        self.metadata_calls = 0

    def write(self, version: str) -> None:
        folder = self.path / "gru4rec" / version
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ranker.METADATA_FILE).write_text(json.dumps(
            {"serving": {"first_item_id": 2, "max_len": 5, "max_k": 4}, "vocabulary": [f"{version}-{i}" for i in ITEMS]}))

    async def get_model_config(self, name, version, as_json, client_timeout):  # noqa: ANN001, ANN201
        """No `vitrine.metadata.<version>` parameter: versions exported without a registry (the file fallback)."""
        if self.unreachable:
            raise InferenceServerException("failed to connect", status="StatusCode.UNAVAILABLE")
        return {"config": {"name": name, "parameters": {}}}

    async def get_model_metadata(self, name, as_json, client_timeout):  # noqa: ANN001, ANN201
        self.metadata_calls += 1
        await asyncio.wait_for(self.hang.wait(), client_timeout)
        if self.unreachable:
            raise InferenceServerException("failed to connect", status="StatusCode.UNAVAILABLE")
        return {"versions": list(self.versions)}

    async def is_model_ready(self, name, version, client_timeout=None):  # noqa: ANN001, ANN201
        if self.unreachable:
            raise InferenceServerException("failed to connect", status="StatusCode.UNAVAILABLE")
        return version in self.versions


async def test_the_catalogue_follows_newer_versions_and_keeps_the_last_while_triton_is_away(tmp_path: Path) -> None:
    triton = Repository(tmp_path)
    for version in ("1", "2"):
        triton.write(version)
    catalog = ModelCatalog(triton, tmp_path, refresh_s=0.0, call_timeout_s=1.0)  # type: ignore[arg-type]
    assert (await catalog.resolve("gru4rec", "")).version == "1"
    triton.versions = ["1", "2"]
    await catalog.resolve("gru4rec", "")  # stale: answers from the cache, refreshes in the background
    await asyncio.sleep(0.01)
    assert (await catalog.resolve("gru4rec", "")).version == "2"
    triton.unreachable = True
    for _ in range(3):
        assert (await catalog.resolve("gru4rec", "")).version == "2"
        await asyncio.sleep(0.01)


async def test_concurrent_requests_share_one_readiness_call_and_a_hung_triton_costs_only_the_budget(tmp_path: Path) -> None:
    triton = Repository(tmp_path)
    triton.write("1")
    triton.hang.clear()
    catalog = ModelCatalog(triton, tmp_path, refresh_s=60.0, call_timeout_s=5.0)  # type: ignore[arg-type]

    async def bounded() -> ServedModel:
        async with asyncio.timeout(0.05):
            return await catalog.resolve("gru4rec", "")

    outcomes = await asyncio.gather(*(bounded() for _ in range(50)), return_exceptions=True)
    assert all(isinstance(o, TimeoutError) for o in outcomes)
    assert triton.metadata_calls == 1  # one call in flight for all fifty, still running for the next ones
    triton.hang.set()
    assert (await catalog.resolve("gru4rec", "")).version == "1" and triton.metadata_calls == 1


async def test_a_vocabulary_is_parsed_off_the_event_loop_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    triton = Repository(tmp_path)
    triton.write("1")
    threads: list[threading.Thread] = []
    load = ServedModel.load

    def spying(repository: Path, name: str, version: str) -> ServedModel:
        threads.append(threading.current_thread())
        return load(repository, name, version)

    monkeypatch.setattr(ServedModel, "load", staticmethod(spying))
    catalog = ModelCatalog(triton, tmp_path, refresh_s=60.0, call_timeout_s=1.0)  # type: ignore[arg-type]
    models = await asyncio.gather(*(catalog.resolve("gru4rec", "1") for _ in range(20)))
    assert len({id(m) for m in models}) == 1 and models[0].item_ids[0] == "1-i0"
    assert len(threads) == 1 and threads[0] is not threading.main_thread()


# --- per-version state is freed (issue 12.11) -------------------------------------------------------
async def test_evicted_versions_release_batchers_and_drift_forgets_gone_variants() -> None:
    triton = Triton()
    service, _, metrics = gateway(triton)
    await service.Recommend(request(), Context(5.0))
    pool = service.rankers
    assert pool.loaded() == {("gru4rec", "1")}
    await pool.evict({("gru4rec", "1")})
    assert pool.loaded() == set() and not label_sets(metrics.batch_size, ("model",))
    drift = DriftMonitor(metrics, window=10, interval_s=60, min_observations=1)
    model = ServedModel("m", "1", 5, 4, ITEMS, 2, {i: n + 2 for n, i in enumerate(ITEMS)},
                        reference={"popularity_mix": {"bucket_upper_index": [3, 5, 7, 10]}})
    for variant in ("old", "new"):
        drift.observe(variant, model, np.array([0, 2, 3, 1, 4]), 1.0)
        metrics.drift_psi.labels("sequence_length", variant).set(0.1)
    drift.forget(keep_variants={"new"})
    assert set(drift._rings) == {"new"}
    assert label_sets(metrics.drift_psi, ("feature", "variant")) == {("sequence_length", "new")}


# --- settings, labels and logs that hostile input cannot abuse (issue 12.1, 12.6, 12.9) ---------------
def test_no_keys_are_accepted_unless_configured_or_the_demo_is_asked_for() -> None:
    assert GatewaySettings().accepted_keys == {} and GatewaySettings().reflection is False
    demo = GatewaySettings(demo_keys=True).accepted_keys
    assert sorted(key.role for key in demo.values()) == ["admin", "experimenter", "storefront"]


async def test_denied_calls_are_labelled_from_a_fixed_set_and_bad_bodies_become_invalid_argument() -> None:
    from vitrine.services.gateway.auth import AuthInterceptor

    denied: list[str] = []
    malformed: list[str] = []
    interceptor = AuthInterceptor({}, on_denied=lambda method, code: denied.append(method), on_malformed=malformed.append)

    class Details:
        def __init__(self, method: str, metadata: tuple = ()) -> None:
            self.method, self.invocation_metadata = method, metadata

    async def continuation(details):  # noqa: ANN001, ANN202 - what grpc resolves a known path to
        async def recommend(request, context):  # noqa: ANN001, ANN202
            return pb.RecommendResponse(request_id=request.user_id)
        return grpc.unary_unary_rpc_method_handler(recommend, request_deserializer=pb.RecommendRequest.FromString,
                                                   response_serializer=pb.RecommendResponse.SerializeToString)

    for n in range(5):
        await interceptor.intercept_service(continuation, Details(f"/evil{n}.Svc/Method{n}"))
    await interceptor.intercept_service(continuation, Details("/vitrine.v1.Recommender/Recommend"))
    assert denied == ["unknown"] * 5 + ["Recommend"]
    handler = await interceptor.intercept_service(continuation, Details("/grpc.health.v1.Health/Check"))  # open: no key needed
    decoded = handler.request_deserializer(pb.RecommendRequest(user_id="u1").SerializeToString())
    assert (await handler.unary_unary(decoded, Context())).request_id == "u1"
    garbage = handler.request_deserializer(b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")  # never raises
    with pytest.raises(Aborted) as aborted:
        await handler.unary_unary(garbage, Context())
    assert aborted.value.code is grpc.StatusCode.INVALID_ARGUMENT and malformed == ["Check"]


def test_the_same_error_is_logged_once_per_interval_with_a_count_of_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from vitrine.services.throttled_log import ThrottledLog

    clock = Clock()
    throttled = ThrottledLog(logging.getLogger("test.throttled"), interval_s=10, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.throttled"):
        written = [throttled.log(logging.WARNING, "k", "bad body %d", n) for n in range(100)]
        clock.now = 10.5
        throttled.log(logging.WARNING, "k", "bad body again")
        throttled.log(logging.WARNING, "other", "another kind")
    assert written.count(True) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "bad body 0", "bad body again (99 more like it in the last 10 s not logged)", "another kind"]
