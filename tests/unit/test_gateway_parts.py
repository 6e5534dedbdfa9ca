"""The gateway's pure parts, without services: micro-batcher, A/B assignment, request validation,
API-key lookup, the serving encoding (same as training), and the generated protobuf code."""

from __future__ import annotations

import asyncio
import filecmp
import hashlib
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from vitrine.contracts import ranker
from vitrine.contracts.events import EventType
from vitrine.export.data import sequences
from vitrine.export.data.table import EventTable
from vitrine.services.features.store import RecentEvent
from vitrine.services.gateway.auth import identify
from vitrine.services.gateway.batcher import MicroBatcher, QueueFull
from vitrine.services.gateway.experiment import BUCKETS, Experiment, Variant, bucket_of
from vitrine.services.gateway.ranking import ServedModel
from vitrine.services.gateway.service import InvalidRequest, validate
from vitrine.settings import REPO_ROOT, ApiKey
from vitrine.v1 import recommender_pb2 as pb


class _Recorder:
    """An `infer` for the batcher: records batch sizes, can be held back, answers row * 10."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.release = asyncio.Event()
        self.release.set()
        self.fail = False

    async def __call__(self, rows, timeout):  # noqa: ANN001, ANN204
        self.sizes.append(len(rows))
        await self.release.wait()
        if self.fail:
            raise RuntimeError("triton is down")
        return [row * 10 for row in rows]


@pytest.mark.timeout(10)
async def test_a_lone_request_goes_out_at_once() -> None:
    infer = _Recorder()
    batcher = MicroBatcher(infer, max_batch=8, max_delay_s=5.0, queue_size=100, max_inflight=1)
    batcher.start()
    try:
        assert await asyncio.wait_for(batcher.submit(3), 1.0) == 30  # far below the 5 s delay: no waiting when idle
        assert infer.sizes == [1]
    finally:
        await batcher.stop()


@pytest.mark.timeout(10)
async def test_an_idle_batcher_sends_a_lone_request_from_the_callers_own_task() -> None:
    infer = _Recorder()
    sizes: list[int] = []
    batcher = MicroBatcher(infer, max_batch=8, max_delay_s=5.0, queue_size=100, max_inflight=1,
                           on_batch=lambda size, waits: sizes.append(size))
    # Not started: no batching loop exists, so only the caller's task can have sent it.
    assert await asyncio.wait_for(batcher.submit(4), 1.0) == 40
    assert infer.sizes == [1] and sizes == [1]


@pytest.mark.timeout(10)
async def test_requests_arriving_while_busy_share_batches_of_at_most_max_batch() -> None:
    infer = _Recorder()
    batcher = MicroBatcher(infer, max_batch=4, max_delay_s=0.05, queue_size=100, max_inflight=1)
    batcher.start()
    try:
        infer.release.clear()
        first = asyncio.create_task(batcher.submit(0))
        while not infer.sizes:  # the first batch is now in flight and held
            await asyncio.sleep(0)
        rest = [asyncio.create_task(batcher.submit(n)) for n in range(1, 10)]
        await asyncio.sleep(0)  # every caller has queued its row
        infer.release.set()
        results = await asyncio.gather(first, *rest)
        assert results == [n * 10 for n in range(10)]  # each caller gets its own row's answer
        assert infer.sizes[0] == 1 and sum(infer.sizes) == 10 and max(infer.sizes) == 4 and len(infer.sizes) <= 4
    finally:
        await batcher.stop()


@pytest.mark.timeout(10)
async def test_an_error_reaches_every_caller_of_the_batch_and_the_next_batch_works() -> None:
    infer = _Recorder()
    batcher = MicroBatcher(infer, max_batch=8, max_delay_s=0.01, queue_size=100, max_inflight=1)
    batcher.start()
    try:
        infer.release.clear()
        infer.fail = True
        first = asyncio.create_task(batcher.submit(0))  # idle: sent at once and held in flight
        while not infer.sizes:
            await asyncio.sleep(0)
        rest = [asyncio.create_task(batcher.submit(n)) for n in range(1, 5)]  # busy: these queue up
        await asyncio.sleep(0.02)
        infer.release.set()
        outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
        assert infer.sizes == [1, 4]  # a real batch of four was sent, and it failed
        assert all(type(o) is RuntimeError and str(o) == "triton is down" for o in outcomes), outcomes
        assert len({id(o) for o in outcomes[1:]}) == 1  # one error, handed to every member of the batch
        infer.fail = False
        assert await batcher.submit(7) == 70
    finally:
        await batcher.stop()


@pytest.mark.timeout(10)
async def test_a_full_queue_sheds_at_submit() -> None:
    infer = _Recorder()
    infer.release.clear()
    batcher = MicroBatcher(infer, max_batch=1, max_delay_s=0.0, queue_size=2, max_inflight=1)
    batcher.start()
    try:
        # While Triton is stuck, at most: one batch in flight, one waiting for a slot, `queue_size` queued.
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.02)
        calls = [asyncio.create_task(batcher.submit(n)) for n in range(1, 10)]
        await asyncio.sleep(0.02)
        shed = [c for c in calls if c.done() and isinstance(c.exception(), QueueFull)]
        kept = [first] + [c for c in calls if not c.done()]
        assert len(shed) + len(kept) == 10 and len(shed) >= 5 and len(kept) <= 2 + 2
        infer.release.set()
        answers = await asyncio.wait_for(asyncio.gather(*kept), 5)
        assert answers == [0] + [n * 10 for n in range(1, len(kept))]
    finally:
        await batcher.stop()


def _experiment(control: int, salt: str = "s") -> Experiment:
    return Experiment(salt=salt, variants=(Variant(name="control", model_name="gru4rec", weight=control),
                                           Variant(name="treatment", model_name="sasrec", weight=100 - control)))


def test_assignment_is_sticky_accurate_and_moves_only_the_users_it_must() -> None:
    users = [f"user-{n}" for n in range(20_000)]
    first = [_experiment(70).assign(u).name for u in users]
    assert first == [_experiment(70).assign(u).name for u in users]
    assert abs(Counter(first)["control"] / len(users) - 0.70) < 0.015
    moved = [(a, _experiment(60).assign(u).name) for u, a in zip(users, first, strict=True)]
    changes = Counter(pair for pair in moved if pair[0] != pair[1])
    assert set(changes) == {("control", "treatment")} and abs(changes[("control", "treatment")] / len(users) - 0.10) < 0.01
    reshuffled = [_experiment(70, salt="other").assign(u).name for u in users]
    assert sum(a != b for a, b in zip(first, reshuffled, strict=True)) > 0.3 * len(users)
    assert all(0 <= bucket_of("s", u) < BUCKETS for u in users[:100])


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ((("a", 60), ("b", 30)), "sum to 100"),
        ((("a", 50), ("a", 50)), "unique"),
        ((("Not OK", 100),), "pattern"),
        ((), "at least 1"),
    ],
)
def test_experiments_that_make_no_sense_are_refused(variants, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValidationError, match=message):
        Experiment(salt="s", variants=tuple(Variant(name=n, model_name="gru4rec", weight=w) for n, w in variants))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"user_id": ""}, "user_id"), ({"user_id": "x" * 129}, "user_id"), ({"user_id": "a b"}, "user_id"),
        ({"k": 0}, "k must"), ({"k": 51}, "k must"), ({"exclude_item_ids": ["i"] * 101}, "exclude_item_ids"),
        ({"exclude_item_ids": ["bad item"]}, "exclude_item_ids"), ({"request_id": "r" * 129}, "request_id"),
        ({"context": pb.Context(page="p" * 65)}, "context.page"), ({"context": pb.Context(item_id="a b")}, "context.item_id"),
        ({"context": pb.Context(attributes={str(n): "v" for n in range(17)})}, "context.attributes"),
    ],
)
def test_invalid_requests_name_what_is_wrong(fields: dict, field: str) -> None:
    request = pb.RecommendRequest(**{"user_id": "u1", "k": 5, **fields})
    with pytest.raises(InvalidRequest, match=field):
        validate(request, max_k=50, max_exclusions=100)


def test_a_valid_request_passes() -> None:
    validate(pb.RecommendRequest(user_id="u:1@shop", k=50, exclude_item_ids=["i1"], context=pb.Context(page="pdp", item_id="i2")), 50, 100)


def test_api_keys_are_looked_up_by_their_hash() -> None:
    keys = {hashlib.sha256(b"secret").hexdigest(): ApiKey(name="shop", role="storefront")}
    assert identify((("authorization", "Bearer secret"),), keys) == keys[hashlib.sha256(b"secret").hexdigest()]
    assert identify((("authorization", "secret"),), keys) is not None
    assert identify((("authorization", "Bearer wrong"),), keys) is None
    assert identify((), keys) is None and identify(None, keys) is None


def _model() -> ServedModel:
    items = ("a", "b", "c", "d")
    return ServedModel("m", "1", max_len=5, max_k=4, item_ids=items, first_item_id=2, index={i: n + 2 for n, i in enumerate(items)})


def test_serving_encoding_collapses_runs_pads_and_maps_unknown_items() -> None:
    model = _model()
    recent = [RecentEvent(i, t, n, f"e{n}") for n, (i, t) in enumerate(
        [("a", EventType.VIEW), ("a", EventType.ADD_TO_CART), ("zzz", EventType.VIEW), ("b", EventType.CLICK)])]
    items, types = model.history(recent)
    assert items.tolist() == [0, 0, 2, 1, 3] and types.tolist() == [0, 0, 3, 1, 2]
    assert model.exclusions(["b", "b", "nope", "a"], 3).tolist() == [3, 2, 0]
    assert model.exclusions(["a", "b", "c", "d"], 2).tolist() == [2, 3]
    decoded = model.decode(np.array([5, 0, 3, 1]), np.array([2.0, ranker.EXCLUDED_SCORE - 1, 1.0, 0.5]))
    assert decoded == [("d", 2.0), ("b", 1.0)]


def test_serving_and_training_collapse_agree() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    table = EventTable(event_id=np.array([f"e{i}" for i in range(n)]), user_id=np.array([f"u{rng.integers(30)}" for _ in range(n)]),
                       item_id=np.array([f"i{rng.integers(8)}" for _ in range(n)]), type=rng.integers(0, 4, n).astype(np.int8),
                       ts_ms=np.sort(rng.integers(10**12, 10**12 + 10**6, n)))
    vocabulary = sequences.Vocabulary(tuple(f"i{k}" for k in range(8)))
    steps = sequences.collapse(table, vocabulary)
    order = np.lexsort((table.ts_ms, table.user_id))
    users = table.user_id[order]
    for u, user in enumerate(sorted(set(users.tolist()))):
        rows = order[users == user]
        items, kinds = sequences.collapse_runs(table.item_id[rows].tolist(), (table.type[rows].astype(int) + 1).tolist())
        lo, hi = steps.user_start[u], steps.user_start[u + 1]
        assert [vocabulary.index(i) for i in items] == steps.item[lo:hi].tolist()
        assert kinds == steps.type[lo:hi].tolist()


def test_generated_protobuf_code_is_current(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", "proto/vitrine/v1/recommender.proto"], cwd=REPO_ROOT, check=True)
    for name in ("recommender_pb2.py", "recommender_pb2.pyi", "recommender_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "vitrine" / "v1" / name, REPO_ROOT / "vitrine" / "v1" / name, shallow=False), name


@pytest.mark.timeout(10)
async def test_exposures_never_block_serving_and_drops_beyond_the_buffer_are_counted() -> None:
    from prometheus_client import CollectorRegistry

    from vitrine.contracts.exposures import Exposure
    from vitrine.services.gateway.exposures import ExposureLog
    from vitrine.services.gateway.metrics import GatewayMetrics

    metrics = GatewayMetrics(CollectorRegistry())
    log = ExposureLog("127.0.0.1:1", capacity=3, metrics=metrics)  # no Kafka there, and the sender not started
    record = Exposure(request_id="r", user_id="u", ts_ms=1, variant="a", model_name="m", model_version="1",
                      item_ids=["i"], scores=[1.0], latency_ms=1.0, degraded=False)
    for _ in range(5):
        log.record(record)  # returns at once: serving never waits on Kafka
    assert log.buffer.qsize() == 3
    assert metrics.exposures_dropped.labels("buffer_full")._value.get() == 2


class _FlakyProducer:
    """An AIOKafkaProducer stand-in: `send` raises for the first `refuse` calls, then the next `fail` deliveries
    fail (a timeout's error on the future), then every record is acknowledged and kept in `topic`."""

    topic: list = []

    def __init__(self, refuse: int, fail: int, **_: object) -> None:
        self.refuse, self.fail = refuse, fail

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        if self.refuse:
            self.refuse -= 1
            raise ConnectionError("broker away")
        if self.fail:
            self.fail -= 1
            future.set_exception(TimeoutError("no acknowledgement"))
        else:
            _FlakyProducer.topic.append(value)
            future.set_result(None)
        return future


@pytest.mark.timeout(10)
async def test_a_kafka_error_keeps_the_batch_and_sends_it_again_so_answers_equal_sent_plus_dropped_plus_buffered(monkeypatch) -> None:
    import json

    from prometheus_client import CollectorRegistry

    from vitrine.contracts.exposures import Exposure
    from vitrine.services.gateway import exposures
    from vitrine.services.gateway.exposures import ExposureLog
    from vitrine.services.gateway.metrics import GatewayMetrics

    monkeypatch.setattr(exposures, "RETRY_S", 0.01)
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    producers = iter([_FlakyProducer(refuse=0, fail=3), _FlakyProducer(refuse=2, fail=0), _FlakyProducer(refuse=0, fail=0)])
    _FlakyProducer.topic = []
    log = ExposureLog("unused", capacity=100, metrics=metrics, producer_factory=lambda **_: next(producers))

    def counted() -> tuple[float, float, float]:
        sample = registry.get_sample_value
        return (sample("vitrine_gateway_exposures_sent_total"),
                sum(sample("vitrine_gateway_exposures_dropped_total", {"reason": r}) for r in ("buffer_full", "shutdown")),
                sample("vitrine_gateway_exposures_buffered_records"))

    for n in range(20):
        log.record(Exposure(request_id=f"r{n}", user_id="u", ts_ms=1, variant="a", model_name="m", model_version="1",
                            item_ids=["i"], scores=[1.0], latency_ms=1.0, degraded=False))
    assert sum(counted()) == 20
    log.start()
    while counted()[0] < 20:
        assert sum(counted()) == 20  # at every moment: answered = sent + dropped + buffered
        await asyncio.sleep(0.001)
    await log.stop()
    assert counted() == (20, 0, 0)
    assert sorted(json.loads(v)["request_id"] for v in _FlakyProducer.topic) == sorted(f"r{n}" for n in range(20))
