"""MovieLens ratings as storefront events, so that models can be trained on real interaction data.

Reads the two usual layouts from local files (nothing is downloaded):
- `ratings.csv` (ml-latest, ml-25m…): header `userId,movieId,rating,timestamp`, comma-separated;
- `u.data` (ml-100k): `user item rating timestamp`, tab-separated, no header.
A rating is an interaction whose strength follows the rating: ≥4.5 → purchase, ≥4 → add_to_cart,
≥3 → click, below → view. Timestamps are seconds and become milliseconds.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from vitrine.export.data.table import EventTable

RATINGS_HEADER = ["userId", "movieId", "rating", "timestamp"]


def _type_of(rating: float) -> int:
    if rating >= 4.5:
        return 3
    if rating >= 4:
        return 2
    if rating >= 3:
        return 1
    return 0


def load(path: Path) -> EventTable:
    """Load `ratings.csv` or `u.data` (recognised by content, not by name)."""
    with path.open(newline="") as handle:
        first = handle.readline()
        handle.seek(0)
        if first.strip().split(",")[:4] == RATINGS_HEADER:
            rows = csv.reader(handle)
            next(rows)
            source = "ratings.csv"
        elif "\t" in first:
            rows = csv.reader(handle, delimiter="\t")
            source = "u.data"
        else:
            raise ValueError(f"{path}: neither MovieLens ratings.csv (header {','.join(RATINGS_HEADER)}) nor u.data (tab-separated)")
        users, items, kinds, times = [], [], [], []
        for number, row in enumerate(rows, 2 if source == "ratings.csv" else 1):
            if not row:
                continue
            try:
                user, item, rating, ts = row[0], row[1], float(row[2]), int(row[3])
            except (IndexError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: expected user, item, rating, timestamp; got {row!r}") from exc
            if not (user.strip() and item.strip()) or not 0 <= rating <= 5 or ts <= 0:
                raise ValueError(f"{path}:{number}: out-of-range values in {row!r}")
            users.append(f"ml{user.strip()}")
            items.append(f"m{item.strip()}")
            kinds.append(_type_of(rating))
            times.append(ts * 1000)
    if not users:
        raise ValueError(f"{path}: no ratings")
    count = len(users)
    table = EventTable(
        event_id=np.char.add(f"{source}-", np.arange(count).astype(str)),
        user_id=np.array(users, dtype=str),
        item_id=np.array(items, dtype=str),
        type=np.array(kinds, dtype=np.int8),
        ts_ms=np.array(times, dtype=np.int64),
    )
    return table.sorted_by_time()
