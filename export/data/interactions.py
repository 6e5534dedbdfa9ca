"""A plain interaction log (user, item, time) as storefront events: public data sets beyond MovieLens.

Reads a local CSV file (nothing is downloaded) with a header naming at least `user_id`, `item_id` and
`timestamp` (UTC seconds), and optionally:
- `seq_pos`: the order of a user's interactions that share one timestamp (review data is stamped by
  day, so many do); it becomes a millisecond offset, so that the time split and the steps keep the
  published order;
- `type`: view, click, add_to_cart or purchase. Without it every row is a `purchase`, which is what a
  review or a rating-as-transaction stands for.
The Amazon 5-core benchmark in docs/benchmarks.md is loaded this way.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from vitrine.contracts.events import EventType
from vitrine.export.data.table import EventTable

REQUIRED = ("user_id", "item_id", "timestamp")
MAX_SAME_SECOND = 1000
"""`seq_pos` must stay below this: each position adds one millisecond to its timestamp."""


def load(path: Path) -> EventTable:
    with path.open(newline="") as handle:
        rows = csv.DictReader(handle)
        missing = [c for c in REQUIRED if c not in (rows.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: header lacks {', '.join(missing)} (needs {', '.join(REQUIRED)}; optional seq_pos, type)")
        kinds_by_name = {t.value: i for i, t in enumerate(EventType)}
        users, items, kinds, times = [], [], [], []
        for number, row in enumerate(rows, 2):
            try:
                user, item, ts = row["user_id"].strip(), row["item_id"].strip(), int(row["timestamp"])
                pos = int(row["seq_pos"]) if row.get("seq_pos") not in (None, "") else 0
                kind = kinds_by_name[row["type"].strip()] if row.get("type") else kinds_by_name["purchase"]
            except (KeyError, ValueError, AttributeError) as exc:
                raise ValueError(f"{path}:{number}: expected user_id, item_id, timestamp[, seq_pos, type]; got {row!r}") from exc
            if not (user and item) or ts <= 0 or not 0 <= pos < MAX_SAME_SECOND:
                raise ValueError(f"{path}:{number}: out-of-range values in {row!r}")
            users.append(f"u{user}")
            items.append(f"i{item}")
            kinds.append(kind)
            times.append(ts * 1000 + pos)
    if not users:
        raise ValueError(f"{path}: no interactions")
    table = EventTable(
        event_id=np.char.add(f"{path.stem}-", np.arange(len(users)).astype(str)),
        user_id=np.array(users, dtype=str),
        item_id=np.array(items, dtype=str),
        type=np.array(kinds, dtype=np.int8),
        ts_ms=np.array(times, dtype=np.int64),
    )
    return table.sorted_by_time()
