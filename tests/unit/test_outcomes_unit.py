"""The pure join (services/outcomes/attribution.py): the credit rule, order independence, dedupe, conflicts,
interleaving verdicts and pruning. No services are started."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter

import pytest

from vitrine.contracts.events import Event, EventRejected, EventType
from vitrine.contracts.exposures import Exposure
from vitrine.services.outcomes.attribution import (
    BUFFERED, CONFLICT, CREDITED_NOW, DUPLICATE, PendingEvent, StoredExposure, UserState, Windows, attribute, parse_exposure, verdict,
)

T0 = 1_700_000_000_000
MIN = 60_000
W = Windows(click_ms=30 * MIN, add_to_cart_ms=120 * MIN, purchase_ms=24 * 60 * MIN, max_lateness_ms=24 * 60 * MIN)


def x(rid: str, ts: int, items: list[str], variant: str = "a", revision: int = 1, slots: list[str] | None = None) -> Exposure:
    return Exposure(request_id=rid, user_id="u", ts_ms=ts, variant=variant, model_name="m", model_version="1",
                    item_ids=items, scores=[0.0] * len(items), latency_ms=1.0, degraded=False, experiment="exp", revision=revision,
                    mode="interleave" if slots else "ab", slot_variants=slots or [])


def e(eid: str, ts: int, item: str, kind: EventType = EventType.CLICK) -> Event:
    return Event(event_id=eid, user_id="u", item_id=item, type=kind, ts_ms=ts)


FAR_FUTURE = T0 + 365 * 24 * 60 * MIN
"""The consumer's clock in tests whose event times must move the watermark freely."""


def run(*batches: list, state: UserState | None = None, windows: Windows = W, now_ms: int = FAR_FUTURE):
    """Join batches one after another on one state; the summed row deltas and the changes of each batch."""
    state = state or UserState("u")
    rows: dict = {}
    interleaved: dict = {}
    all_changes = []
    for batch in batches:
        changes = attribute(state, batch, windows, now_ms)
        state.seen_events |= set(changes.new_events)
        state.seen_requests |= set(changes.new_requests)
        state.watermark_ms = changes.watermark_ms
        for key, deltas in changes.row_deltas.items():
            rows.setdefault(key, Counter()).update(deltas)
        for key, deltas in changes.interleaved_deltas.items():
            interleaved.setdefault(key, Counter()).update(deltas)
        all_changes.append(changes)
    clean = {k: +v for k, v in rows.items()}
    return clean, {k: +v for k, v in interleaved.items()}, state, all_changes


def credited_to(state: UserState, event_id: str) -> str:
    return state.pending[event_id].credited


def test_a_click_credits_the_most_recent_exposure_that_showed_the_item_within_the_window() -> None:
    rows, _, state, _ = run([
        x("r1", T0, ["i1", "i2"]), x("r2", T0 + 5 * MIN, ["i1"]), x("r3", T0 + 6 * MIN, ["i9"]),  # r3 did not show i1
        e("c1", T0 + 10 * MIN, "i1"),
    ])
    assert credited_to(state, "c1") == "r2"
    assert rows[("exp", 1)] == Counter(exposures=3, impressions=4, clicks=1)


@pytest.mark.parametrize(("kind", "after_min", "credited"), [
    (EventType.CLICK, 30, True), (EventType.CLICK, 31, False),
    (EventType.ADD_TO_CART, 120, True), (EventType.ADD_TO_CART, 121, False),
    (EventType.PURCHASE, 24 * 60, True), (EventType.PURCHASE, 24 * 60 + 1, False),
])
def test_windows_per_type_are_inclusive(kind: EventType, after_min: int, credited: bool) -> None:
    rows, _, _, _ = run([x("r1", T0, ["i1"]), e("ev", T0 + after_min * MIN, "i1", kind)])
    field = {EventType.CLICK: "clicks", EventType.ADD_TO_CART: "add_to_carts", EventType.PURCHASE: "purchases"}[kind]
    assert rows[("exp", 1)][field] == (1 if credited else 0)


def test_an_event_before_the_exposure_in_event_time_and_views_are_never_credited() -> None:
    rows, _, _, _ = run([x("r1", T0, ["i1"]), e("c0", T0 - 1, "i1"), e("v1", T0 + 1, "i1", EventType.VIEW)])
    assert rows[("exp", 1)]["clicks"] == 0


def test_an_event_read_before_its_exposure_is_buffered_then_credited() -> None:
    rows, _, state, changes = run([e("c1", T0 + MIN, "i1")], [x("r1", T0, ["i1"])])
    assert changes[0].event_verdicts[0][1] == BUFFERED
    assert credited_to(state, "c1") == "r1"
    assert rows[("exp", 1)]["clicks"] == 1
    assert changes[1].credits == [("exp", "a", EventType.CLICK)]


def test_a_later_arriving_more_recent_exposure_takes_the_credit_over() -> None:
    rows, _, state, changes = run(
        [x("r1", T0, ["i1"], revision=1), e("c1", T0 + 10 * MIN, "i1")],
        [x("r2", T0 + 5 * MIN, ["i1"], revision=2)],
    )
    assert credited_to(state, "c1") == "r2"
    assert rows[("exp", 1)].get("clicks", 0) == 0 and rows[("exp", 2)]["clicks"] == 1
    assert changes[1].recredits == 1 and changes[1].credits == []


def test_duplicates_of_both_change_nothing() -> None:
    batch = [x("r1", T0, ["i1"]), e("c1", T0 + MIN, "i1"), e("p1", T0 + 2 * MIN, "i1", EventType.PURCHASE)]
    once, _, _, _ = run(batch)
    twice, _, _, changes = run(batch + batch, list(reversed(batch)))
    assert once == twice
    assert all(v == DUPLICATE for _, v in changes[1].event_verdicts + changes[1].exposure_verdicts)


def test_every_arrival_order_ends_the_same() -> None:
    records = [x("r1", T0, ["i1", "i2"]), x("r2", T0 + 3 * MIN, ["i2"]), x("r3", T0 + 4 * MIN, ["i1"], revision=2),
               e("c1", T0 + 5 * MIN, "i1"), e("c2", T0 + 6 * MIN, "i2"), e("a1", T0 + 7 * MIN, "i1", EventType.ADD_TO_CART),
               e("v1", T0 - MIN, "i1", EventType.VIEW)]
    results = set()
    rng = random.Random(7)
    for order in itertools.permutations(records):
        cut = rng.randrange(len(order) + 1)
        rows, _, _, changes = run(list(order[:cut]), list(order[cut:]))
        pre = {k: v for c in changes for k, v in c.recount_pre_events.items()}
        results.add((tuple(sorted((k, tuple(sorted(v.items()))) for k, v in rows.items())), pre[("exp", 1)], pre[("exp", 2)]))
    assert len(results) == 1


def test_the_first_variant_is_kept_and_a_conflicting_exposure_is_ignored() -> None:
    rows, _, state, changes = run([x("r1", T0, ["i1"], variant="a")], [x("r2", T0 + MIN, ["i1"], variant="b"), e("c1", T0 + 2 * MIN, "i1")])
    assert changes[1].exposure_verdicts[0][1] == CONFLICT
    assert state.rows[("exp", 1)].variant == "a"
    assert rows[("exp", 1)] == Counter(exposures=1, impressions=1, clicks=1)
    assert credited_to(state, "c1") == "r1"


def test_pre_events_are_recounted_before_the_earliest_exposure() -> None:
    _, _, _, changes = run([x("r2", T0 + 10 * MIN, ["i1"])], [e("v1", T0 + MIN, "i1", EventType.VIEW)], [x("r1", T0, ["i1"])])
    assert changes[0].recount_pre_events == {("exp", 1): T0 + 10 * MIN}
    assert changes[1].recount_pre_events == {("exp", 1): T0 + 10 * MIN}  # a late event before the first exposure
    assert changes[2].recount_pre_events == {("exp", 1): T0}  # the first exposure moved earlier


def test_interleaved_clicks_go_to_the_slot_owner_with_a_verdict_per_exposure() -> None:
    slots = ["m1", "m2", "m1", "m2"]
    _, il, _, _ = run([
        x("r1", T0, ["i1", "i2", "i3", "i4"], slots=slots), e("c1", T0 + 1, "i1"), e("c2", T0 + 2, "i3"), e("c3", T0 + 3, "i2"),
        x("r2", T0 + MIN, ["j1", "j2"], slots=["m2", "m1"]), e("c4", T0 + MIN + 1, "j1"), e("c5", T0 + MIN + 2, "j2"),
        x("r3", T0 + 2 * MIN, ["k1", "k2"], slots=["m1", "m2"]),  # no click: no verdict
    ])
    assert il[("exp", 1)] == Counter({"exposures": 3, "clicks:m1": 3, "clicks:m2": 2, "wins:m1": 1, "ties": 1})


def test_a_moved_click_moves_the_interleaving_verdict() -> None:
    _, il, _, _ = run([x("r1", T0, ["i1", "i2"], slots=["m1", "m2"]), e("c1", T0 + 2 * MIN, "i1")],
                      [x("r2", T0 + MIN, ["i1", "i2"], slots=["m2", "m1"])])
    assert il[("exp", 1)] == Counter({"exposures": 2, "clicks:m2": 1, "wins:m2": 1})


def test_verdict() -> None:
    assert verdict({}) is None and verdict({"a": 0, "b": 0}) is None
    assert verdict({"a": 2, "b": 1}) == "wins:a" and verdict({"a": 1, "b": 1}) == "ties"


def test_pruning_keeps_events_for_max_lateness_and_exposures_for_the_longest_window_more() -> None:
    windows = Windows(click_ms=30 * MIN, add_to_cart_ms=30 * MIN, purchase_ms=60 * MIN, max_lateness_ms=10 * MIN)
    _, _, state, changes = run([x("r1", T0, ["i1"]), e("c1", T0 + MIN, "i1")],
                               [e("v9", T0 + 11 * MIN + 1, "i1", EventType.VIEW)], windows=windows)
    assert "c1" in changes[1].del_pending and "c1" not in state.pending
    assert "r1" in state.exposures  # kept: T0 ≥ watermark − lateness − longest window
    _, _, state, changes = run([], [e("v10", T0 + 71 * MIN + 1, "i1", EventType.VIEW)], state=state, windows=windows)
    assert "r1" in changes[1].del_exposures and not state.exposures


def test_exposure_records_are_parsed_or_rejected_with_a_reason() -> None:
    good = x("r1", T0, ["i1"]).model_dump_json()
    assert parse_exposure(good).request_id == "r1"
    cases = {
        b"not json": "not_json", None: "not_json", b'{"request_id": "r"}': "missing_field",
        x("r1", 5, ["i1"]).model_dump_json().encode(): "absurd_timestamp",
        good.replace('"mode":"ab"', '"mode":"interleave"').encode(): "invalid_field",
        good.replace('"degraded":false', '"degraded":false,"extra":1').encode(): "invalid_field",
    }
    for raw, reason in cases.items():
        with pytest.raises(EventRejected) as caught:
            parse_exposure(raw, now_ms=T0)
        assert caught.value.reason == reason, raw


def test_random_traffic_in_random_batches_and_orders_equals_the_plain_python_reference() -> None:
    """The join, batch after batch on the state it leaves, ends where the reference (all records at once) does."""
    from tests.integration import outcome_reference

    rng = random.Random(11)
    exposures, events = [], []
    for n in range(40):
        shown = rng.sample([f"i{k}" for k in range(8)], 3)
        slots = [rng.choice(["m1", "m2"]) for _ in shown] if n % 3 == 0 else None
        exposures.append(x(f"r{n}", T0 + rng.randrange(120) * MIN, shown, revision=1 + n % 2, slots=slots))
    for n in range(120):
        kind = rng.choice([EventType.VIEW, EventType.CLICK, EventType.CLICK, EventType.ADD_TO_CART, EventType.PURCHASE])
        events.append(e(f"e{n}", T0 + rng.randrange(-30, 200) * MIN, f"i{rng.randrange(8)}", kind))
    # interleaved and A/B exposures of one user must live in different experiments (one variant per revision)
    exposures = [xx.model_copy(update={"experiment": "il" if xx.mode == "interleave" else "exp"}) for xx in exposures]
    expected = outcome_reference.compute(exposures, events, {"click": W.click_ms, "add_to_cart": W.add_to_cart_ms,
                                                             "purchase": W.purchase_ms})
    for trial in range(5):
        records = exposures + events + rng.sample(exposures + events, 30)  # duplicates too
        rng.shuffle(records)
        cuts = sorted(rng.sample(range(len(records)), 6))
        batches = [records[a:b] for a, b in zip([0, *cuts], [*cuts, len(records)], strict=True)]
        rows, il, state, changes = run(*batches)
        for key, want in expected.users.items():
            got = {r.user_id: r for r in want}["u"]
            counts = rows[key]
            assert (counts["exposures"], counts["impressions"], counts["clicks"], counts["add_to_carts"], counts["purchases"]) == (
                got.exposures, got.impressions, got.clicks, got.add_to_carts, got.purchases), (trial, key)
            first = state.rows[key].first_ts_ms
            assert first == min(xx.ts_ms for xx in exposures if (xx.experiment, xx.revision) == key), (trial, key)
        [want_il] = expected.interleaved[("il", 1)]
        got_il = il[("il", 1)]
        assert (got_il["clicks:m1"], got_il["clicks:m2"], got_il["wins:m1"], got_il["wins:m2"], got_il["ties"]) == (
            want_il.clicks_a, want_il.clicks_b, want_il.wins_a, want_il.wins_b, want_il.ties), trial


def test_pre_events_count_the_users_distinct_events_before_the_first_exposure_counted_by_hand() -> None:
    """Planted: 3 distinct events before the revision's first exposure (one of them sent twice, one a view), 1 at
    the very instant of the first exposure (not before it), 2 after. By hand: pre_events = 3 — whatever the order."""
    records = [
        e("b1", T0 - 3 * MIN, "i1", EventType.VIEW), e("b2", T0 - 2 * MIN, "i2"), e("b2", T0 - 2 * MIN, "i2"),
        e("b3", T0 - 1, "i3", EventType.PURCHASE),
        e("at", T0, "i1"),
        x("r2", T0 + 10 * MIN, ["i1"]), x("r1", T0, ["i1"]),  # the first exposure arrives second
        e("a1", T0 + MIN, "i1"), e("a2", T0 + 20 * MIN, "i2", EventType.VIEW),
    ]
    for order in (records, list(reversed(records)), records[5:] + records[:5]):
        state = UserState("u")
        seen: dict[str, int] = {}
        recount: dict = {}
        for record in order:  # one record per batch, as the store would apply them
            changes = attribute(state, [record], W, FAR_FUTURE)
            state.seen_events |= set(changes.new_events)
            state.seen_requests |= set(changes.new_requests)
            seen.update(changes.new_events)
            recount.update(changes.recount_pre_events)
        before = recount[("exp", 1)]
        assert before == T0
        assert sum(1 for ts in seen.values() if ts < before) == 3  # what the store's ZCOUNT over the dedupe set returns


def test_a_future_dated_event_does_not_move_the_watermark_past_the_clock_and_prune_what_a_late_exposure_credits() -> None:
    """An event dated 20 h ahead (accepted by the contract) arrives; a click buffered just before it must still be
    credited by its exposure arriving 5 minutes late. With the watermark at the event's time, pruning (1 h lateness)
    would have dropped the click."""
    windows = Windows(click_ms=30 * MIN, add_to_cart_ms=30 * MIN, purchase_ms=60 * MIN, max_lateness_ms=60 * MIN, clock_skew_ms=5 * MIN)
    now = T0 + 10 * MIN
    state = UserState("u")
    first = attribute(state, [e("c1", T0 + MIN, "i1"), e("future", now + 20 * 60 * MIN, "i9", EventType.VIEW)], windows, now)
    assert first.watermark_ms == now + 5 * MIN  # capped at the clock plus the allowed skew
    assert "c1" not in first.del_pending and "c1" in state.pending
    state.watermark_ms = first.watermark_ms
    state.seen_events |= set(first.new_events)
    second = attribute(state, [x("r1", T0, ["i1"])], windows, now + 5 * MIN)
    assert state.pending["c1"].credited == "r1"
    assert second.row_deltas[("exp", 1)]["clicks"] == 1


def test_stored_row_fields_decode_from_the_right_whatever_the_name_and_a_damaged_field_is_skipped_and_counted() -> None:
    from vitrine.services.outcomes.attribution import Row
    from vitrine.services.outcomes.store import OutcomeStore, decode_row, row_field
    from vitrine.settings import OutcomesSettings

    # The bytes the service wrote for "spring\x1fsale" revision 4 before names were validated (HGETALL returns bytes).
    assert row_field("spring\x1fsale", 4).encode() == b"r\x1fspring\x1fsale\x1f4"
    assert decode_row("r\x1fspring\x1fsale\x1f4", "control\x1f1700000000000") == (("spring\x1fsale", 4), Row("control", 1_700_000_000_000))
    assert decode_row(row_field("exp", 12), "treatment\x1f5") == (("exp", 12), Row("treatment", 5))
    corrupt: list[str] = []
    store = OutcomeStore(client=type("NoRedis", (), {"register_script": lambda self, s: None})(), settings=OutcomesSettings(),
                         on_corrupt=corrupt.append)
    assert store._decoded("u", "meta", b"r\x1fspring\x1fsale\x1f4", b"control\x1f1700000000000", decode_row) == (
        ("spring\x1fsale", 4), Row("control", 1_700_000_000_000))
    assert store._decoded("u", "meta", b"r\x1fexp\x1fsale", b"control\x1f1", decode_row) is None  # no revision at all
    assert store._decoded("u", "meta", b"r\x1fexp\x1f4", b"no separator", decode_row) is None
    assert store._decoded("u", "exposure", b"r1", b"{not json", StoredExposure.from_json) is None
    assert store._decoded("u", "pending", b"e1", b'["i1", "wishlist", 1, ""]', PendingEvent.from_json) is None
    assert corrupt == ["meta", "meta", "exposure", "pending"]


def test_experiment_names_are_validated_where_they_enter_with_one_pattern() -> None:
    from pydantic import ValidationError

    from vitrine.contracts.experiments import is_experiment_name
    from vitrine.services.gateway.experiment import Experiment, Variant

    good = ["default", "exp", "ab-1a2b3c4d", "il-otest-1a2b", "interleave-1a2b", "spring.sale_2026", "X", "a" * 64]
    bad = ["spring\x1fsale", "spring sale", "", "-lead", ".lead", "a" * 65, "ünïcode", "a:b", "a/b", "a\n"]
    variants = (Variant(name="a", model_name="m", weight=100),)
    for name in good:
        assert is_experiment_name(name)
        assert Experiment(name=name, salt="s", variants=variants).name == name
        assert parse_exposure(x("r1", T0, ["i1"]).model_copy(update={"experiment": name}).model_dump_json()).experiment == name
    assert parse_exposure(x("r1", T0, ["i1"]).model_copy(update={"experiment": ""}).model_dump_json()).experiment == ""  # old records
    for name in bad:
        assert not is_experiment_name(name) or name == "", name
        if name:
            with pytest.raises(ValidationError, match="name"):
                Experiment(name=name, salt="s", variants=variants)
        raw = x("r1", T0, ["i1"]).model_dump_json().replace('"experiment":"exp"', f'"experiment":{json.dumps(name)}')
        if name:
            with pytest.raises(EventRejected) as caught:
                parse_exposure(raw, now_ms=T0)
            assert caught.value.reason == "invalid_field" and "experiment" in caught.value.detail, name


def test_eviction_risk_accepts_only_a_redis_that_cannot_evict() -> None:
    from vitrine.services.member import eviction_risk

    assert eviction_risk("noeviction", 1 << 30) is None
    assert eviction_risk("volatile-lru", 0) is None  # no memory cap: nothing is ever evicted
    for policy in ("volatile-lru", "volatile-lfu", "volatile-ttl", "volatile-random", "allkeys-lru", "allkeys-lfu", "allkeys-random"):
        risk = eviction_risk(policy, 1 << 30)
        assert risk is not None and policy in risk and "noeviction" in risk


class _Seeks:
    """An AIOKafkaConsumer stand-in that records where the member seeks."""

    def __init__(self) -> None:
        self.seeks: list[tuple[str, int, object]] = []

    def seek(self, tp, offset: int) -> None:  # noqa: ANN001
        self.seeks.append((tp.topic, tp.partition, offset))

    async def seek_to_beginning(self, *tps) -> None:  # noqa: ANN002
        self.seeks += [(tp.topic, tp.partition, "beginning") for tp in tps]

    async def committed(self, tp) -> int:  # noqa: ANN001 - Kafka's commit: never the answer for an unstored partition
        return 999


def _member(stored: dict):  # noqa: ANN202
    from prometheus_client import CollectorRegistry

    from vitrine.services.member import StoredOffsetsMember
    from vitrine.services.outcomes.metrics import OutcomeMetrics
    from vitrine.settings import OutcomesSettings

    class Member(StoredOffsetsMember):
        async def stored_offsets(self) -> dict:
            return stored

    member = Member()
    member.cfg = OutcomesSettings()
    member.metrics = OutcomeMetrics(CollectorRegistry())
    member.consumer = _Seeks()
    member.processed = {}
    return member


async def test_a_partition_without_a_stored_offset_is_read_from_the_beginning_at_assignment_and_after_a_refused_write() -> None:
    """One meaning for "no offset in Redis": nothing of the partition is stored, so read it all (not Kafka's commit)."""
    from aiokafka import TopicPartition

    member = _member({("t", 0): 42})
    await member.seek_to_stored_offsets({TopicPartition("t", 0), TopicPartition("t", 1)})
    assert sorted(member.consumer.seeks, key=str) == sorted([("t", 0, 42), ("t", 1, "beginning")], key=str)
    assert member.processed == {TopicPartition("t", 0): 42}
    member.consumer.seeks.clear()
    member.processed[TopicPartition("t", 1)] = 10
    await member.rewind({("t", 1): -1}, {})
    assert member.consumer.seeks == [("t", 1, "beginning")] and TopicPartition("t", 1) not in member.processed


async def test_rejects_read_again_after_a_refused_write_are_not_sent_or_counted_twice() -> None:
    from aiokafka import ConsumerRecord

    member = _member({})
    sent: list = []

    class Dlq:
        async def send(self, rejects) -> None:  # noqa: ANN001
            sent.extend(record.offset for record, _ in rejects)

    member.dead_letters = Dlq()
    member.dead_lettered = __import__("collections").OrderedDict()

    def record(offset: int) -> ConsumerRecord:
        return ConsumerRecord("t", 0, offset, 0, 0, None, b"x", None, 0, 1, [])

    await member.dead_letter([(record(3), EventRejected("not_json", "d")), (record(5), EventRejected("not_json", "d"))])
    await member.dead_letter([(record(3), EventRejected("not_json", "d")), (record(5), EventRejected("not_json", "d")),
                              (record(8), EventRejected("missing_field", "d"))])  # the batch read again, plus a new reject
    assert sent == [3, 5, 8]
    assert member.metrics.rejected.labels("not_json")._value.get() == 2
    assert member.metrics.rejected.labels("missing_field")._value.get() == 1


@pytest.mark.timeout(10)
async def test_a_batch_fetched_across_a_rebalance_is_not_joined_and_its_partitions_go_back_to_the_stored_positions() -> None:
    """`getmany` returned records read from the positions before the assignment's seeks: joining them and then reading
    again from the stored offsets would join them twice. The batch is dropped and each partition put back."""
    import asyncio

    from aiokafka import ConsumerRecord, TopicPartition

    stop = asyncio.Event()
    stored, unstored = TopicPartition("t", 0), TopicPartition("t", 1)
    member = _member({})
    member.processed = {stored: 40}
    member.batch_lock = asyncio.Lock()
    member.assignments = 0
    member.last_offset_check = __import__("time").monotonic()  # no idle offset check in this loop
    member.partition_lag = type("Lag", (), {"update": lambda self, consumer, processed: None})()
    processed: list = []

    async def process(batch) -> None:  # noqa: ANN001
        processed.append(batch)

    async def getmany(timeout_ms: int, max_records: int) -> dict:
        if member.assignments == 0:
            member.assignments += 1  # the rebalance listener ran while this fetch was out
            return {tp: [ConsumerRecord(tp.topic, tp.partition, o, 0, 0, None, b"x", None, 0, 1, []) for o in range(7, 9)]
                    for tp in (stored, unstored)}
        stop.set()
        return {}

    async def commit(offsets) -> None:  # noqa: ANN001
        pass

    member.process = process
    member.consumer.getmany = getmany
    member.consumer.assignment = lambda: {stored, unstored}
    member.consumer.commit = commit
    await member.consume(stop)
    assert processed == []
    assert sorted(member.consumer.seeks, key=str) == sorted([("t", 0, 40), ("t", 1, "beginning")], key=str)
