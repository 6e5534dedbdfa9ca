"""The archive's layout, commit protocol, recovery and compaction on a temp folder (no services).

Crashes are simulated by running only some of the protocol's steps (stage / commit / publish, merge / drop)
and then doing what a restarted consumer does: `recover`, then read."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from vitrine.contracts.events import Event, EventContext, EventType
from vitrine.contracts.exposures import Exposure
from vitrine.export.data.archive import load
from vitrine.services.archive.store import (
    SCHEMAS,
    TABLES,
    ArchiveCorrupt,
    ArchiveReader,
    ArchiveStore,
    OffsetsDisagree,
    Part,
    Row,
    bucket,
    raw_glob,
    visible,
)

T0 = int(datetime(2026, 12, 1, 13, 5, tzinfo=UTC).timestamp() * 1000)
HOUR = 3_600_000
TOPIC = "events"


def _store(root: Path) -> ArchiveStore:
    return ArchiveStore(root, {"events": TOPIC, "exposures": "recs.served"})


def _rows(first: int, last: int, partition: int = 0, ts_ms=lambda offset: T0 + (offset % 3) * HOUR) -> list[Row]:  # noqa: ANN001
    return [Row(Event(event_id=f"e{partition}-{o}", user_id=f"u{o % 7}", item_id=f"i{o % 5}", type=EventType.VIEW, ts_ms=ts_ms(o)),
                partition, o, T0) for o in range(first, last + 1)]


def _read_ids(store: ArchiveStore, topic: str = TOPIC) -> list[str]:
    return [row[0] for row in ArchiveReader(store).query("SELECT event_id FROM events").rows] if topic == TOPIC else []


def _raw_count(root: Path) -> int:
    """What an engine without the shadow rule reads (Spark or Trino on the folder)."""
    reader = ArchiveReader(_store(root))
    return reader.query(f"SELECT count(*) FROM read_parquet('{raw_glob(root, TOPIC)}')").rows[0][0]


# --- layout --------------------------------------------------------------------------------------------------

def test_a_part_name_round_trips_and_sorts_by_offset(tmp_path: Path) -> None:
    part = Part(TOPIC, "2026-12-01", 13, 3, 1234, 1300)
    assert part.relpath == "topic=events/date=2026-12-01/hour=13/part-p00003-00000000000000001234-00000000000000001300.parquet"
    assert Part.parse(tmp_path / part.relpath) == part
    assert Part.parse(tmp_path / part.folder / part.temp_name) is None  # temp files are not parts
    assert Part.parse(tmp_path / "topic=events/date=2026-12-01/hour=13/part-0.parquet") is None
    names = [Part(TOPIC, "d", 0, 0, f, f + 1).name for f in (9, 10, 100)]
    assert names == sorted(names)


def test_the_hour_is_the_event_time_in_utc() -> None:
    assert bucket(T0) == ("2026-12-01", 13)
    assert bucket(int(datetime(2026, 12, 31, 23, 59, 59, 999000, tzinfo=UTC).timestamp() * 1000)) == ("2026-12-31", 23)


def test_the_schema_has_every_contract_field_typed() -> None:
    for name, model in TABLES.items():
        assert set(model.model_fields) <= set(SCHEMAS[name].names)
    events = SCHEMAS["events"]
    assert str(events.field("ts_ms").type) == "int64" and not events.field("ts_ms").nullable
    assert events.field("context").nullable and str(events.field("context").type).startswith("struct<page: string")
    assert str(SCHEMAS["exposures"].field("scores").type) == "list<item: double>"


def test_the_shadow_rule_keeps_the_widest_range_once() -> None:
    small = [Part(TOPIC, "2026-12-01", 13, 0, a, b) for a, b in ((0, 9), (10, 19), (20, 29))]
    merged = Part(TOPIC, "2026-12-01", 13, 0, 0, 29)
    later = Part(TOPIC, "2026-12-01", 13, 0, 30, 39)
    other_partition = Part(TOPIC, "2026-12-01", 13, 1, 0, 5)
    other_hour = Part(TOPIC, "2026-12-01", 14, 0, 0, 9)
    assert visible([*small, merged, later, other_partition, other_hour]) == sorted([merged, later, other_partition, other_hour])
    assert visible(small) == small


# --- flush, commit, recovery ---------------------------------------------------------------------------------

def test_a_flush_writes_one_file_per_hour_named_with_its_range_and_stores_the_next_offset(tmp_path: Path) -> None:
    store = _store(tmp_path)
    staged = store.flush(TOPIC, 0, 0, 29, _rows(0, 29), expected_next=None)
    assert sorted(p.hour for p in staged.parts) == [13, 14, 15]
    assert {p.name for p in staged.parts} == {"part-p00000-00000000000000000000-00000000000000000029.parquet"}
    assert store.next_offset(TOPIC, 0) == 30
    assert sorted(_read_ids(store)) == sorted(f"e0-{o}" for o in range(30))
    hours = ArchiveReader(store).query("SELECT hour, count(*) FROM events GROUP BY hour ORDER BY hour").rows
    assert hours == [(13, 10), (14, 10), (15, 10)]
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_crash_before_the_commit_point_leaves_nothing_visible_and_recovery_removes_the_temp_files(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.flush(TOPIC, 0, 0, 9, _rows(0, 9), expected_next=None)
    store.stage(TOPIC, 0, 10, 19, _rows(10, 19))  # crash here: staged, not committed
    assert len(_read_ids(store)) == 10
    recovery = store.recover(TOPIC, 0)
    assert recovery.next_offset == 10 and recovery.temp_removed == 3 and recovery.rolled_forward == 0
    assert not list(tmp_path.rglob("*.tmp"))
    store.flush(TOPIC, 0, 10, 19, _rows(10, 19), expected_next=10)  # the records read again after the restart
    assert sorted(_read_ids(store)) == sorted(f"e0-{o}" for o in range(20))


def test_a_crash_after_the_commit_point_is_rolled_forward(tmp_path: Path) -> None:
    store = _store(tmp_path)
    staged = store.stage(TOPIC, 2, 0, 29, _rows(0, 29, partition=2))
    store.commit(staged, expected_next=None)
    first = staged.parts[0]
    os.rename(tmp_path / first.folder / first.temp_name, tmp_path / first.relpath)  # crash after one of three renames
    assert len(_read_ids(store)) == 10  # a prefix of the flush, never a duplicate
    recovery = store.recover(TOPIC, 2)
    assert recovery.next_offset == 30 and recovery.rolled_forward == 2
    assert sorted(_read_ids(store)) == sorted(f"e2-{o}" for o in range(30))


def test_a_committed_file_that_vanished_is_reported_not_ignored(tmp_path: Path) -> None:
    store = _store(tmp_path)
    staged = store.flush(TOPIC, 0, 0, 29, _rows(0, 29), expected_next=None)
    (tmp_path / staged.parts[1].relpath).unlink()
    with pytest.raises(ArchiveCorrupt, match="neither it, its temp file nor a compacted file"):
        store.recover(TOPIC, 0)


def test_a_writer_whose_offset_is_not_the_stored_one_is_refused(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.flush(TOPIC, 0, 0, 9, _rows(0, 9), expected_next=None)
    with pytest.raises(OffsetsDisagree) as refused:
        store.flush(TOPIC, 0, 10, 19, _rows(10, 19), expected_next=None)  # e.g. a second member that found no state
    assert refused.value.stored == 10
    with pytest.raises(ValueError, match="overlaps committed offsets"):
        store.flush(TOPIC, 0, 5, 19, _rows(5, 19), expected_next=10)
    assert not list(tmp_path.rglob("*.tmp"))  # the refused flushes' staged files are gone
    assert store.recover(TOPIC, 0).next_offset == 10 and len(_read_ids(store)) == 10


def test_a_flush_of_only_rejected_records_advances_the_offset_without_a_file(tmp_path: Path) -> None:
    store = _store(tmp_path)
    staged = store.flush(TOPIC, 1, 0, 4, [], expected_next=None)
    assert staged.parts == () and store.next_offset(TOPIC, 1) == 5
    assert store.recover(TOPIC, 1).next_offset == 5


def test_without_a_state_file_the_next_offset_follows_the_files(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.flush(TOPIC, 0, 0, 29, _rows(0, 29), expected_next=None)
    store.state_path(TOPIC, 0).unlink()
    assert store.next_offset(TOPIC, 0) == 30
    assert store.next_offset(TOPIC, 1) is None


# --- compaction ----------------------------------------------------------------------------------------------

def _many_small_files(store: ArchiveStore, files: int, per_file: int = 10, partition: int = 0) -> None:
    for k in range(files):
        first = k * per_file
        store.flush(TOPIC, partition, first, first + per_file - 1, _rows(first, first + per_file - 1, partition, ts_ms=lambda o: T0),
                    expected_next=first or None)


def test_compaction_merges_a_closed_hours_files_into_one_covering_their_range(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _many_small_files(store, 5)
    assert store.compaction_candidates(TOPIC, 0, now_ms=T0, grace_ms=0, min_files=2) == []  # the hour is not over
    [group] = store.compaction_candidates(TOPIC, 0, now_ms=T0 + HOUR, grace_ms=0, min_files=2)
    done = store.compact(group)
    assert (done.merged, done.rows) == (5, 50)
    [part] = store.parts(TOPIC, 0)
    assert (part.first, part.last) == (0, 49)
    table = pq.read_table(tmp_path / part.relpath)
    assert table.column("kafka_offset").to_pylist() == list(range(50))
    assert sorted(_read_ids(store)) == sorted(f"e0-{o}" for o in range(50)) and _raw_count(tmp_path) == 50
    assert store.recover(TOPIC, 0).next_offset == 50


def test_a_crash_between_the_merge_and_the_deletes_shows_no_duplicate_and_recovery_cleans_up(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _many_small_files(store, 4)
    [group] = store.compaction_candidates(TOPIC, 0, now_ms=T0 + HOUR, grace_ms=0, min_files=2)
    store.merge(group)  # crash here: the union renamed in, the parts still there
    assert len(store.parts(TOPIC, 0)) == 5
    assert sorted(_read_ids(store)) == sorted(f"e0-{o}" for o in range(40))  # the shadow rule
    assert _raw_count(tmp_path) == 80  # what a reader without it would see, until recovery
    assert store.recover(TOPIC, 0).shadowed_removed == 4
    assert _raw_count(tmp_path) == 40


def test_late_events_after_a_compaction_are_a_new_file_merged_by_the_next_pass(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _many_small_files(store, 3)
    [group] = store.compaction_candidates(TOPIC, 0, now_ms=T0 + HOUR, grace_ms=0, min_files=2)
    store.compact(group)
    store.flush(TOPIC, 0, 30, 39, _rows(30, 39, ts_ms=lambda o: T0), expected_next=30)  # late: the closed hour again
    [group] = store.compaction_candidates(TOPIC, 0, now_ms=T0 + HOUR, grace_ms=0, min_files=2)
    store.compact(group)
    [part] = store.parts(TOPIC, 0)
    assert (part.first, part.last) == (0, 39) and _raw_count(tmp_path) == 40


def test_a_committed_flush_that_was_compacted_since_is_not_called_corrupt(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _many_small_files(store, 3)
    [group] = store.compaction_candidates(TOPIC, 0, now_ms=T0 + HOUR, grace_ms=0, min_files=2)
    store.compact(group)  # the last flush's file is gone, covered by the union
    assert store.recover(TOPIC, 0).next_offset == 30


def test_merged_files_stay_for_the_retention_so_a_reader_that_listed_them_can_still_read_them(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _many_small_files(store, 4)
    listed_before = store.files(TOPIC)  # a reader's list, taken before the compaction
    [group] = store.compaction_candidates(TOPIC, 0, now_ms=T0 + HOUR, grace_ms=0, min_files=2)
    store.compact(group, retention_s=300)
    assert all(f.exists() for f in listed_before)
    assert sorted(_read_ids(store)) == sorted(f"e0-{o}" for o in range(40))  # a new reader sees the union only
    merged_at = (tmp_path / store.files(TOPIC)[0].relative_to(tmp_path)).stat().st_mtime
    assert store.remove_shadowed(TOPIC, 0, retention_s=300, now_s=merged_at + 299) == 0
    assert store.recover(TOPIC, 0, retention_s=300).shadowed_removed == 0  # a rebalance does not cut the retention short
    assert store.remove_shadowed(TOPIC, 0, retention_s=300, now_s=merged_at + 300) == 4
    assert not any(f.exists() for f in listed_before) and _raw_count(tmp_path) == 40


# --- reading -------------------------------------------------------------------------------------------------

def test_an_empty_archive_has_empty_tables(tmp_path: Path) -> None:
    reader = ArchiveReader(_store(tmp_path))
    assert reader.query("SELECT count(*) FROM events").rows == [(0,)]
    assert reader.query("SELECT count(*) FROM exposures").rows == [(0,)]
    assert reader.stats()["events"]["rows"] == 0


def test_exposures_are_archived_as_typed_columns(tmp_path: Path) -> None:
    store = _store(tmp_path)
    exposure = Exposure(request_id="r1", user_id="u1", ts_ms=T0, variant="control", model_name="gru4rec", model_version="3",
                        item_ids=["i1", "i2"], scores=[0.5, 0.25], latency_ms=4.5, degraded=False)
    store.flush("recs.served", 0, 0, 0, [Row(exposure, 0, 0, T0)], expected_next=None)
    rows = ArchiveReader(store).query("SELECT request_id, item_ids, scores[2], date, hour, topic FROM exposures").rows
    assert rows == [("r1", ["i1", "i2"], 0.25, datetime(2026, 12, 1).date(), 13, "recs.served")]


def test_stats_count_rows_per_date_and_type(tmp_path: Path) -> None:
    store = _store(tmp_path)
    events = [Row(Event(event_id=f"e{i}", user_id="u", item_id="i", type=t, ts_ms=T0 + i * 24 * HOUR,
                        context=EventContext(page="pdp")), 0, i, T0)
              for i, t in enumerate([EventType.VIEW, EventType.VIEW, EventType.PURCHASE])]
    store.flush(TOPIC, 0, 0, 2, events, expected_next=None)
    stats = ArchiveReader(store).stats()["events"]
    assert stats["rows"] == 3 and stats["files"] == 3
    assert [(d["date"], d["type"], d["rows"]) for d in stats["per_date"]] == [
        ("2026-12-01", "view", 1), ("2026-12-02", "view", 1), ("2026-12-03", "purchase", 1)]


def test_the_training_loader_reads_a_date_range_once_per_event_id(tmp_path: Path) -> None:
    store = _store(tmp_path)
    day = 24 * HOUR
    rows = _rows(0, 29, ts_ms=lambda o: T0 + (o % 3) * day)
    duplicate = Row(rows[0].value, 1, 0, T0)  # the same event sent twice by a retrying producer
    store.flush(TOPIC, 0, 0, 29, rows, expected_next=None)
    store.flush(TOPIC, 1, 0, 0, [duplicate], expected_next=None)
    everything = load(tmp_path, events_topic=TOPIC)
    assert len(everything) == 30 and len(set(everything.event_id.tolist())) == 30
    assert list(everything.ts_ms) == sorted(everything.ts_ms)
    middle = load(tmp_path, since="2026-12-02", until="2026-12-02", events_topic=TOPIC)
    assert len(middle) == 10 and set(middle.ts_ms.tolist()) == {T0 + day}
    assert middle.type.dtype.name == "int8" and set(middle.type.tolist()) == {0}
    with pytest.raises(ValueError, match="after"):
        load(tmp_path, since="2026-12-03", until="2026-12-01", events_topic=TOPIC)


# --- the command line ----------------------------------------------------------------------------------------

def _cli(*args: str):  # noqa: ANN202
    from typer.testing import CliRunner

    from vitrine.cli import app

    return CliRunner().invoke(app, list(args), env={"VITRINE_ARCHIVE__EVENTS_TOPIC": TOPIC, "COLUMNS": "300"})


def _small_archive(root: Path) -> ArchiveStore:
    store = _store(root)
    store.flush(TOPIC, 0, 0, 29, _rows(0, 29, ts_ms=lambda o: T0 + (o % 3) * 24 * HOUR), expected_next=None)
    return store


def test_data_stats_sample_and_query_read_the_archive(tmp_path: Path) -> None:
    import json

    _small_archive(tmp_path)
    stats = _cli("data", "stats", "--root", str(tmp_path), "--json")
    assert stats.exit_code == 0, stats.output
    events = json.loads(stats.stdout)["events"]
    assert events["rows"] == 30 and events["files"] == 3 and events["first"].startswith("2026-12-01T13")
    table = _cli("data", "stats", "--root", str(tmp_path))
    assert table.exit_code == 0 and "30 rows in 3 files" in table.output and "2026-12-03" in table.output
    sample = _cli("data", "sample", "--n", "5", "--root", str(tmp_path), "--json")
    assert sample.exit_code == 0 and len(json.loads(sample.stdout)) == 5
    query = _cli("data", "query", "SELECT hour, count(*) AS n FROM events GROUP BY hour", "--root", str(tmp_path))
    assert query.exit_code == 0 and query.stdout.splitlines()[0].split() == ["hour", "n"] and "30" not in query.stdout.splitlines()[0]


def test_data_commands_refuse_bad_input_with_exit_2(tmp_path: Path) -> None:
    _small_archive(tmp_path)
    assert _cli("data", "sample", "--n", "0", "--root", str(tmp_path)).exit_code == 2
    assert _cli("data", "sample", "--table", "orders", "--root", str(tmp_path)).exit_code == 2
    bad_sql = _cli("data", "query", "SELEKT 1", "--root", str(tmp_path))
    assert bad_sql.exit_code == 2 and "syntax error" in bad_sql.output.lower()
    missing = _cli("data", "stats", "--root", str(tmp_path / "nowhere"))
    assert missing.exit_code == 2 and "is not a folder" in missing.output


def test_train_reads_the_archive_and_refuses_bad_date_flags(tmp_path: Path) -> None:
    _small_archive(tmp_path)
    assert "use them with --archive" in _cli("train", "--since", "2026-12-01").output
    backwards = _cli("train", "--archive", str(tmp_path), "--since", "2026-12-03", "--until", "2026-12-01")
    assert backwards.exit_code == 2 and "is after --until" in backwards.output
    assert _cli("train", "--archive", str(tmp_path), "--since", "01/12/2026").exit_code == 2
    empty = _cli("train", "--archive", str(tmp_path), "--since", "2027-01-01")
    assert empty.exit_code == 2 and "has no events" in empty.output
