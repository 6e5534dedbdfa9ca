from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from vitrine.export.data import movielens, sequences, synthetic
from vitrine.export.data.table import EventTable

FIXTURES = Path(__file__).parent.parent / "fixtures"


@pytest.fixture(scope="module")
def tiny() -> EventTable:
    return synthetic.generate(synthetic.preset("tiny"))


def test_same_seed_same_events_other_seed_other_events(tiny: EventTable) -> None:
    assert synthetic.generate(synthetic.preset("tiny")).fingerprint() == tiny.fingerprint()
    assert synthetic.generate(synthetic.preset("tiny", seed=8)).fingerprint() != tiny.fingerprint()


def test_events_are_time_ordered_unique_and_valid(tiny: EventTable) -> None:
    assert np.all(np.diff(tiny.ts_ms) >= 0)
    assert len(set(tiny.event_id.tolist())) == len(tiny)
    events = list(tiny.events())  # every row passes the wire schema
    assert len(events) == len(tiny)


def test_funnel_steps_follow_a_view_of_the_same_item(tiny: EventTable) -> None:
    seen: dict[tuple[str, str], int] = defaultdict(lambda: -1)
    for user, item, kind in zip(tiny.user_id, tiny.item_id, tiny.type, strict=True):
        key = (str(user), str(item))
        if kind > 0:
            assert seen[key] >= kind - 1, f"{kind} for {key} without the step before it"
        seen[key] = max(seen[key], int(kind)) if kind > 0 else max(seen[key], 0)
    counts = np.bincount(tiny.type, minlength=4)
    assert counts[0] > counts[1] > counts[2] > counts[3] > 0


def test_popularity_has_a_long_tail() -> None:
    table = synthetic.generate(synthetic.preset("small"))
    counts = np.array(sorted(Counter(table.item_id.tolist()).values(), reverse=True))
    head = counts[: len(counts) // 10].sum() / counts.sum()
    assert head > 0.3  # the top 10 % of items take far more than 10 % of events


def test_drift_brings_a_new_item_line_only_after_its_start() -> None:
    base = synthetic.preset("small")
    drift_at = base.start_ms + 7 * synthetic.DAY_MS
    table = synthetic.generate(synthetic.preset("small", drift_at_ms=drift_at))
    new_line = {f"i{i}" for i in range(base.n_items, base.n_items + base.drift_items)}
    is_new = np.isin(table.item_id, list(new_line))
    assert is_new.any() and table.ts_ms[is_new].min() >= drift_at
    after = table.ts_ms >= drift_at
    assert is_new[after].mean() > 0.2


def test_bad_generator_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="transition_prob"):
        synthetic.preset("tiny", transition_prob=1.5)
    with pytest.raises(ValueError, match="unknown preset"):
        synthetic.preset("gigantic")


@pytest.mark.parametrize(("name", "rows", "first_user"), [("ratings.csv", 5, "ml1"), ("u.data", 4, "ml22")])
def test_movielens_files_become_events(name: str, rows: int, first_user: str) -> None:
    table = movielens.load(FIXTURES / name)
    assert len(table) == rows
    assert np.all(np.diff(table.ts_ms) >= 0) and table.ts_ms.min() > 10**11  # milliseconds
    assert table.user_id[0] == first_user
    events = list(table.events())
    by_rating = {e.item_id: e.type.value for e in events}
    if name == "ratings.csv":
        assert by_rating == {"m31": "purchase", "m1029": "click", "m1061": "add_to_cart", "m10": "purchase"}
    else:
        assert by_rating["m377"] == "view" and by_rating["m51"] == "purchase"


def test_movielens_rejects_other_files_with_the_reason(tmp_path: Path) -> None:
    other = tmp_path / "x.csv"
    other.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="neither MovieLens"):
        movielens.load(other)
    broken = tmp_path / "u.data"
    broken.write_text("1\t2\tfive\t881250949\n")
    with pytest.raises(ValueError, match="u.data:1"):
        movielens.load(broken)


def _table(rows: list[tuple[str, str, int, int]]) -> EventTable:
    return EventTable(
        event_id=np.array([f"e{i}" for i in range(len(rows))]),
        user_id=np.array([r[0] for r in rows]),
        item_id=np.array([r[1] for r in rows]),
        type=np.array([r[2] for r in rows], dtype=np.int8),
        ts_ms=np.array([r[3] for r in rows], dtype=np.int64),
    )


def test_runs_on_one_item_collapse_into_one_step_with_the_strongest_type() -> None:
    table = _table([("u", "a", 0, 1), ("u", "a", 1, 2), ("u", "b", 0, 3), ("u", "a", 0, 4), ("v", "b", 3, 5)])
    vocab = sequences.Vocabulary(("a", "b"))
    steps = sequences.collapse(table, vocab)
    assert steps.item.tolist() == [2, 3, 2, 3]  # u: a, b, a; v: b
    assert steps.type.tolist() == [2, 1, 1, 4]  # click, view, view, purchase (+1: 0 is padding)
    assert steps.user_start.tolist() == [0, 3, 4]


def test_time_split_keeps_later_items_out_of_the_vocabulary() -> None:
    table = synthetic.generate(synthetic.preset("small", drift_at_ms=synthetic.preset("small").end_ms - synthetic.DAY_MS))
    dataset = sequences.build(table, max_len=10, validation_fraction=0.05)
    early = set(table.item_id[table.ts_ms < dataset.cutoff_ms].tolist())
    assert set(dataset.vocabulary.item_ids) == early
    late_only = set(table.item_id.tolist()) - early
    assert late_only and all(dataset.vocabulary.index(i) == sequences.OOV for i in late_only)
    assert np.any(dataset.valid_targets == sequences.OOV)
    assert dataset.train_inputs.shape[1] == dataset.valid_inputs.shape[1] == 10
    # Training targets are shifted inputs: next step at every position.
    real = dataset.train_inputs[:, :-1] != 0
    np.testing.assert_array_equal(dataset.train_targets[:, :-1][real], dataset.train_inputs[:, 1:][real])
    assert np.all(dataset.train_targets[dataset.train_inputs == 0] == 0)


def test_histories_are_left_padded_or_cut_to_the_most_recent() -> None:
    items, types = sequences.encode_history([5, 6], [1, 2], 4)
    assert items.tolist() == [0, 0, 5, 6] and types.tolist() == [0, 0, 1, 2]
    items, _ = sequences.encode_history([1, 2, 3, 4, 5], [1] * 5, 3)
    assert items.tolist() == [3, 4, 5]


def _views_and_purchases(cfg: synthetic.StorefrontConfig) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    table = synthetic.generate(cfg)
    rows = [(int(u[1:]), int(i[1:]), int(t)) for u, i, t in zip(table.user_id, table.item_id, table.ts_ms, strict=True)]
    views = [r for r, kind in zip(rows, table.type, strict=True) if kind == 0]
    purchases = [r for r, kind in zip(rows, table.type, strict=True) if kind == 3]
    return views, purchases


def test_missions_send_sessions_to_the_best_sellers_of_a_route_category() -> None:
    """Off the item path, a session on a mission goes to one of `route_items` best sellers of the next category;
    without missions it goes to any popular item of an affinity category. Measured on consecutive views of one
    shopper within a session (< 10 min apart) that are not successor steps."""
    def share_to_best_sellers(cfg: synthetic.StorefrontConfig) -> float:
        sf = synthetic.storefront(cfg)
        best = {int(i) for items in sf.catalog.by_category for i in items[np.argsort(-sf.popularity[items])[:cfg.route_items]]}
        views, _ = _views_and_purchases(cfg)
        by_user: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for user, item, ts in views:
            by_user[user].append((ts, item))
        jumps = hits = 0
        for steps in by_user.values():
            steps.sort()
            for (t1, i1), (t2, i2) in zip(steps, steps[1:]):
                if t2 - t1 < 600_000 and i2 != i1 and i2 not in sf.successors[i1]:
                    jumps += 1
                    hits += i2 in best
        assert jumps > 500
        return hits / jumps

    base = synthetic.preset("small")
    with_missions = share_to_best_sellers(base)
    without = share_to_best_sellers(synthetic.preset("small", missions=1, mission_move_prob=0.0))
    assert with_missions > 0.5 * base.mission_move_prob and with_missions > 1.5 * without, (with_missions, without)


def test_consumables_are_bought_again_in_later_sessions() -> None:
    """Repeat purchases: the same shopper buys the same item again at least an hour later."""
    def repeats(cfg: synthetic.StorefrontConfig) -> int:
        _, purchases = _views_and_purchases(cfg)
        first: dict[tuple[int, int], int] = {}
        count = 0
        for user, item, ts in sorted(purchases, key=lambda r: r[2]):
            if (user, item) in first and ts - first[(user, item)] > 3_600_000:
                count += 1
            first.setdefault((user, item), ts)
        return count

    with_repeats, without = repeats(synthetic.preset("small")), repeats(synthetic.preset("small", repeat_prob=0.0))
    assert with_repeats > 100 and with_repeats > 3 * without, (with_repeats, without)


def test_the_first_order_preset_switches_the_history_structure_off() -> None:
    cfg = synthetic.preset("first_order")
    assert cfg.missions == 1 and cfg.mission_move_prob == 0 and cfg.repeat_prob == 0 and cfg.session_focus == 0
    with pytest.raises(ValueError, match="missions"):
        synthetic.preset("tiny", missions=0)
    with pytest.raises(ValueError, match="mission_concentration"):
        synthetic.preset("tiny", mission_concentration=0.0)


def test_an_interaction_log_keeps_the_published_order_of_one_day(tmp_path: Path) -> None:
    from vitrine.export.data import interactions

    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp,seq_pos\n7,30,86400,1\n7,20,86400,0\n8,30,172800,0\n7,40,172800,2\n")
    table = interactions.load(log)
    seven = [i for u, i in zip(table.user_id, table.item_id, strict=True) if u == "u7"]
    assert seven == ["i20", "i30", "i40"]  # same day: seq_pos decides
    assert table.ts_ms.tolist() == [86_400_000, 86_400_001, 172_800_000, 172_800_002]
    assert set(table.type.tolist()) == {3}  # a review stands for a purchase
    assert len(set(table.event_id.tolist())) == 4


@pytest.mark.parametrize(("text", "message"), [
    ("user,item,time\n1,2,3\n", "header lacks user_id, item_id, timestamp"),
    ("user_id,item_id,timestamp\n1,2,notanumber\n", ":2: expected"),
    ("user_id,item_id,timestamp\n1,2,-5\n", "out-of-range"),
    ("user_id,item_id,timestamp,type\n1,2,5,bought\n", ":2: expected"),
    ("user_id,item_id,timestamp\n", "no interactions"),
])
def test_a_bad_interaction_log_is_refused_with_its_line(tmp_path: Path, text: str, message: str) -> None:
    from vitrine.export.data import interactions

    log = tmp_path / "log.csv"
    log.write_text(text)
    with pytest.raises(ValueError, match=message):
        interactions.load(log)
