"""Training data from the event archive: the events of a date range as an `EventTable`, read in place by DuckDB.

The archive holds every record of the `events` topic once (docs/archive.md); a producer's retry is a second
record with the same event_id, which training must count once: the first one read wins, as in the feature
store."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np

from vitrine.contracts import topics
from vitrine.export.data.table import TYPES, EventTable
from vitrine.services.archive.store import ArchiveReader, ArchiveStore


def load(root: Path, since: date | str | None = None, until: date | str | None = None,
         events_topic: str = topics.EVENTS) -> EventTable:
    """The archive's events whose UTC date is in [since, until] (inclusive; None = open), in time order."""
    since_s = None if since is None else date.fromisoformat(str(since)).isoformat()
    until_s = None if until is None else date.fromisoformat(str(until)).isoformat()
    if since_s and until_s and since_s > until_s:
        raise ValueError(f"since {since_s} is after until {until_s}")
    if not root.is_dir():
        raise FileNotFoundError(f"no archive at {root}")
    columns = ArchiveReader(ArchiveStore(root, {"events": events_topic})).event_columns(since_s, until_s)
    type_index = {t.value: i for i, t in enumerate(TYPES)}
    kinds = columns.column("type").to_pylist()
    return EventTable(
        event_id=np.array(columns.column("event_id").to_pylist(), dtype=str),
        user_id=np.array(columns.column("user_id").to_pylist(), dtype=str),
        item_id=np.array(columns.column("item_id").to_pylist(), dtype=str),
        type=np.array([type_index[k] for k in kinds], dtype=np.int8),
        ts_ms=columns.column("ts_ms").to_numpy().astype(np.int64),
    )
