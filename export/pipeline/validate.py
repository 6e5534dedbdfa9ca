"""Step 1, validate: is the archive's window fit to train on? Every check is a row (check, value, threshold,
pass/fail); one failing row stops the run with the whole table, so that a person sees every problem at once.

Checks (thresholds: `PipelineSettings`):
- schema: every Parquet file of the window has the contract's columns with their types (a file written by
  hand or by an old writer is named with what it lacks) — checked before anything reads the rows;
- volume: at least `min_events`, and events ÷ the previous window of the same length within
  [volume_min_ratio, volume_max_ratio] (not judged when the previous window is empty: a new archive);
- per type: each event type has at least `min_events_per_type` events (a producer that stopped sending
  purchases shows here long before a metric moves);
- unknown items: the share of events whose item no champion vocabulary knows (not judged without a champion);
- time coverage: the share of empty hours between the window's first and last event;
- future timestamps: no event (anywhere in the archive) later than now + max_future_skew_s — a clock bug
  that would put training rows after the held-out slice.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vitrine.export.data.table import TYPES, EventTable
from vitrine.services.archive.store import HOUR_MS, SCHEMAS, ArchiveReader, ArchiveStore, Part
from vitrine.settings import PipelineSettings

REQUIRED_COLUMNS = ("event_id", "user_id", "item_id", "type", "ts_ms")
"""The columns training reads; each must have the contract's Parquet type."""


@dataclass(frozen=True)
class Check:
    check: str
    value: str
    threshold: str
    passed: bool | None
    """None: shown, not judged (e.g. no previous window, no champion)."""


@dataclass(frozen=True)
class Window:
    """UTC dates, both inclusive."""

    since: date
    until: date

    @classmethod
    def trailing(cls, until: date, days: int) -> Window:
        return cls(until - timedelta(days=days - 1), until)

    def previous(self) -> Window:
        days = (self.until - self.since).days + 1
        return Window(self.since - timedelta(days=days), self.since - timedelta(days=1))


@dataclass(frozen=True)
class Validation:
    checks: list[Check]
    table: EventTable | None
    """The window's events when the schema allowed reading them."""

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]

    def as_record(self) -> list[dict]:
        return [asdict(c) for c in self.checks]


def format_checks(checks: Iterable[Check | dict]) -> str:
    """The table a person reads when a run stops."""
    rows = [("check", "value", "threshold", "result")]
    for c in checks:
        c = c if isinstance(c, dict) else asdict(c)
        rows.append((c["check"], c["value"], c["threshold"], {True: "pass", False: "FAIL", None: "not judged"}[c["passed"]]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def window_files(store: ArchiveStore, topic: str, window: Window) -> list[Path]:
    """The visible files whose date partition lies in the window."""
    out = []
    for path in store.files(topic):
        part = Part.parse(path)
        if part is not None and window.since.isoformat() <= part.date <= window.until.isoformat():
            out.append(path)
    return out


def check_schema(files: list[Path]) -> Check:
    """Every file has REQUIRED_COLUMNS with the contract's types; the first offender is named with its problem."""
    expected = SCHEMAS["events"]
    problems = []
    for path in files:
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowInvalid) as exc:
            problems.append(f"{path.name}: unreadable ({exc})")
            continue
        missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
        wrong = [f"{c} is {schema.field(c).type}, not {expected.field(c).type}" for c in REQUIRED_COLUMNS
                 if c in schema.names and schema.field(c).type != expected.field(c).type]
        if missing or wrong:
            problems.append(f"{path.parent.parent.name}/{path.parent.name}/{path.name}: "
                            + "; ".join(([f"missing {', '.join(missing)}"] if missing else []) + wrong))
    value = f"{len(files)} files ok" if not problems else f"{len(problems)} of {len(files)} files bad: {problems[0]}"
    return Check("schema", value, "columns " + ", ".join(REQUIRED_COLUMNS) + " with contract types", not problems)


def check_volume(events: int, previous: int, settings: PipelineSettings) -> list[Check]:
    rows = [Check("volume", f"{events} events", f"≥ {settings.min_events}", events >= settings.min_events)]
    threshold = f"{settings.volume_min_ratio:g}–{settings.volume_max_ratio:g}× previous window"
    if previous == 0:
        rows.append(Check("volume vs previous window", f"{events} vs 0 (no previous window)", threshold, None))
    else:
        ratio = events / previous
        rows.append(Check("volume vs previous window", f"{ratio:.2f}× ({events} vs {previous})", threshold,
                          settings.volume_min_ratio <= ratio <= settings.volume_max_ratio))
    return rows


def check_types(types: np.ndarray, settings: PipelineSettings) -> list[Check]:
    counts = np.bincount(types.astype(np.int64), minlength=len(TYPES)) if len(types) else np.zeros(len(TYPES), dtype=np.int64)
    return [Check(f"events of type {kind.value}", str(int(counts[i])), f"≥ {settings.min_events_per_type}",
                  int(counts[i]) >= settings.min_events_per_type) for i, kind in enumerate(TYPES)]


def check_unknown_items(items: np.ndarray, vocabulary: set[str] | None, settings: PipelineSettings) -> Check:
    threshold = f"≤ {settings.max_unknown_item_share:.0%}"
    if vocabulary is None:
        return Check("items unknown to the champion", "no champion", threshold, None)
    share = float(np.mean([i not in vocabulary for i in items.tolist()])) if len(items) else 0.0
    return Check("items unknown to the champion", f"{share:.1%}", threshold, share <= settings.max_unknown_item_share)


def check_coverage(ts_ms: np.ndarray, settings: PipelineSettings) -> Check:
    """Empty hours between the first and the last event's hour (both count as covered)."""
    threshold = f"≤ {settings.max_empty_hour_share:.0%} empty hours"
    if not len(ts_ms):
        return Check("time coverage", "no events", threshold, False)
    hours = np.unique(ts_ms // HOUR_MS)
    span = int(hours[-1] - hours[0]) + 1
    empty = span - len(hours)
    share = empty / span
    return Check("time coverage", f"{empty} of {span} hours empty ({share:.1%})", threshold, share <= settings.max_empty_hour_share)


def check_future(future_events: int, settings: PipelineSettings) -> Check:
    return Check("future timestamps", f"{future_events} events after now + {settings.max_future_skew_s:g}s", "0",
                 future_events == 0)


def _count(reader: ArchiveReader, where: str, parameters: list[object]) -> int:
    return int(reader.query(f"SELECT count(DISTINCT event_id) FROM events WHERE {where}", parameters).rows[0][0])


def validate(root: Path, events_topic: str, window: Window, settings: PipelineSettings,
             champion_vocabulary: set[str] | None, now_ms: int | None = None) -> Validation:
    """Run every check on the window; the table holds the events when the files could be read."""
    from vitrine.export.data.archive import load

    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    store = ArchiveStore(root, {"events": events_topic})
    files = window_files(store, events_topic, window)
    checks = [check_schema(files)]
    if checks[0].passed is False:
        return Validation(checks, None)  # reading rows of a file without the columns would only fail less clearly
    try:
        table = load(root, window.since, window.until, events_topic)
        reader = ArchiveReader(store)
        previous = window.previous()
        previous_count = _count(reader, "date >= CAST(? AS DATE) AND date <= CAST(? AS DATE)",
                                [previous.since.isoformat(), previous.until.isoformat()])
        future = _count(reader, "ts_ms > ?", [now_ms + int(settings.max_future_skew_s * 1000)])
    except Exception as exc:  # noqa: BLE001 - DuckDB/Arrow errors on odd files: a failed check, not a crash
        checks.append(Check("readable", f"{type(exc).__name__}: {exc}"[:300], "the window's files read", False))
        return Validation(checks, None)
    checks += check_volume(len(table), previous_count, settings)
    checks += check_types(table.type, settings)
    checks.append(check_unknown_items(table.item_id, champion_vocabulary, settings))
    checks.append(check_coverage(table.ts_ms, settings))
    checks.append(check_future(future, settings))
    return Validation(checks, table)
