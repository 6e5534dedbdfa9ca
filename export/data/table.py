"""`EventTable`: events as columns. Millions of events as pydantic objects would cost gigabytes; training
and generators work on these arrays, and `events()` yields schema-checked `Event`s for Kafka."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitrine.contracts.events import Event, EventType

TYPES: tuple[EventType, ...] = tuple(EventType)


@dataclass(frozen=True)
class EventTable:
    event_id: np.ndarray
    user_id: np.ndarray
    item_id: np.ndarray
    type: np.ndarray
    """Index into `TYPES` (int8): view=0 … purchase=3."""
    ts_ms: np.ndarray

    def __post_init__(self) -> None:
        lengths = {len(self.event_id), len(self.user_id), len(self.item_id), len(self.type), len(self.ts_ms)}
        if len(lengths) != 1:
            raise ValueError(f"columns differ in length: {sorted(lengths)}")

    def __len__(self) -> int:
        return len(self.ts_ms)

    def sorted_by_time(self) -> EventTable:
        order = np.lexsort((self.event_id, self.ts_ms))
        return self.take(order)

    def take(self, index: np.ndarray) -> EventTable:
        return EventTable(self.event_id[index], self.user_id[index], self.item_id[index], self.type[index], self.ts_ms[index])

    def events(self) -> Iterator[Event]:
        for event_id, user_id, item_id, kind, ts_ms in zip(
            self.event_id, self.user_id, self.item_id, self.type, self.ts_ms, strict=True
        ):
            yield Event(event_id=str(event_id), user_id=str(user_id), item_id=str(item_id),
                        type=TYPES[int(kind)], ts_ms=int(ts_ms))

    def fingerprint(self) -> str:
        """sha256 over the events in a canonical order: the same data gives the same id on any machine."""
        digest = hashlib.sha256()
        table = self.sorted_by_time()
        for column in (table.event_id, table.user_id, table.item_id):
            digest.update("\x1f".join(column.tolist()).encode())
        digest.update(table.type.astype(np.int8).tobytes())
        digest.update(table.ts_ms.astype("<i8").tobytes())
        return digest.hexdigest()

    def write_jsonl(self, path: Path) -> None:
        with path.open("w") as out:
            for event in self.events():
                out.write(event.model_dump_json(exclude_none=True) + "\n")

    @classmethod
    def from_events(cls, events: list[Event]) -> EventTable:
        type_index = {t: i for i, t in enumerate(TYPES)}
        return cls(
            event_id=np.array([e.event_id for e in events], dtype=str),
            user_id=np.array([e.user_id for e in events], dtype=str),
            item_id=np.array([e.item_id for e in events], dtype=str),
            type=np.array([type_index[e.type] for e in events], dtype=np.int8),
            ts_ms=np.array([e.ts_ms for e in events], dtype=np.int64),
        )

    @classmethod
    def read_jsonl(cls, path: Path) -> EventTable:
        """Read events written by `write_jsonl` (or `vitrine events generate`), validating each line."""
        events = []
        with path.open() as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        events.append(Event.model_validate(json.loads(line)))
                    except (ValueError, TypeError) as exc:
                        raise ValueError(f"{path}:{number}: not a valid event: {exc}") from exc
        return cls.from_events(events)
