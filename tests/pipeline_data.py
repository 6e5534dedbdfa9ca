"""Archive contents for pipeline tests: synthetic storefront events moved to recent times, written as committed
Parquet partitions by the archive store's own writer (the layout readers expect), or deliberately broken files."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vitrine.contracts import topics
from vitrine.export.data import synthetic
from vitrine.export.data.table import EventTable
from vitrine.services.archive.store import ArchiveStore, Row, bucket, hour_folder

HOUR_MS = 3_600_000


def recent(preset: str = "tiny", seed: int = 7, end_ms: int | None = None, **overrides: object) -> EventTable:
    """The preset's events shifted in time so that the last one lies an hour before `end_ms` (default: now)."""
    table = synthetic.generate(synthetic.preset(preset, seed=seed, **overrides))
    end_ms = int(time.time() * 1000) if end_ms is None else end_ms
    shift = end_ms - HOUR_MS - int(table.ts_ms.max())
    return EventTable(table.event_id, table.user_id, table.item_id, table.type, table.ts_ms + shift)


def write_archive(root: Path, table: EventTable, topic: str = topics.EVENTS, partition: int = 0, first_offset: int = 0) -> int:
    """Commit the events as one flush of one Kafka partition (offsets first_offset…); returns the next offset."""
    store = ArchiveStore(root, {"events": topic})
    rows = [Row(event, partition, first_offset + i, event.ts_ms) for i, event in enumerate(table.events())]
    store.flush(topic, partition, first_offset, first_offset + len(rows) - 1, rows, expected_next=None if first_offset == 0 else first_offset)
    return first_offset + len(rows)


def write_file_without(root: Path, table: EventTable, column: str, topic: str = topics.EVENTS) -> Path:
    """A Parquet file in the newest hour folder that lacks `column` (a writer of an older or foreign schema)."""
    day, hour = bucket(int(table.ts_ms.max()))
    folder = root / hour_folder(topic, day, hour)
    folder.mkdir(parents=True, exist_ok=True)
    columns = {"event_id": table.event_id.tolist(), "user_id": table.user_id.tolist(), "item_id": table.item_id.tolist(),
               "type": [["view", "click", "add_to_cart", "purchase"][int(t)] for t in table.type], "ts_ms": table.ts_ms.tolist()}
    columns.pop(column)
    path = folder / f"part-p00099-{0:020d}-{len(table) - 1:020d}.parquet"
    pq.write_table(pa.table(columns), path)
    return path


def future(table: EventTable, hours: int) -> EventTable:
    """The same events `hours` later (a producer whose clock runs ahead)."""
    return EventTable(np.char.add("f-", table.event_id), table.user_id, table.item_id, table.type, table.ts_ms + hours * HOUR_MS)
