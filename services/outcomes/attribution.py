"""The join, as pure functions: one user's stored state plus a batch of that user's records → changes.

No I/O here: `store.py` reads the state and writes the changes (with the offsets, atomically), the
consumer parses and dead-letters. The credit rule (docs/experiments.md, "Attribution"):

* a click, add-to-cart or purchase of item I by user U at event time t credits the **most recent**
  exposure x of U (largest `ts_ms`, ties broken by the larger `request_id`) with
  `x.ts_ms ≤ t ≤ x.ts_ms + window[type]` whose `item_ids` contain I; views are never credited;
* each event credits at most one exposure, at most once (dedupe by `event_id`); an exposure counts
  once (dedupe by `request_id`);
* arrival order does not matter: an event read before its exposure waits in the user's buffer, and an
  exposure that arrives later takes the credit of every buffered event it is a better match for (the
  credit moves: one exposure's counts go down, the other's up). Events stay buffered for
  `max_lateness` of event time behind the user's newest record (the *watermark*); exposures are kept for the
  longest window plus `max_lateness`. The watermark never moves past the consumer's wall clock plus
  `clock_skew` (the event contract accepts times up to a day ahead): one event from a shop with a fast clock
  must not make every pending event of that user look a day old and be pruned;
* per (experiment, revision) the user keeps the variant of the first exposure processed; an exposure
  in another variant is a *conflict*: counted, not stored, never credited;
* `pre_events` of a row = the user's distinct events with event time before their first exposure in
  that revision (the store counts them in the dedupe window).

Interleaving (mode "interleave" with `slot_variants`): a credited click also counts for the team that
filled the clicked slot; per exposure with clicks, the team with more clicks wins, equal numbers tie.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Final

from vitrine.contracts.events import Event, EventType
from vitrine.contracts.exposures import INTERLEAVE, Exposure, parse_exposure  # noqa: F401 - parse_exposure: re-exported (it moved to the contract)

CREDITED: Final = {EventType.CLICK: "clicks", EventType.ADD_TO_CART: "add_to_carts", EventType.PURCHASE: "purchases"}
"""Event types that earn an exposure credit, and the `UserOutcome` field each one counts in."""
RowKey = tuple[str, int]
"""(experiment, revision)."""

# Per-record verdicts, for metrics and tests.
APPLIED: Final = "applied"
DUPLICATE: Final = "duplicate"
CONFLICT: Final = "conflict"
CREDITED_NOW: Final = "credited"
BUFFERED: Final = "buffered"
NOT_CREDITABLE: Final = "not_creditable"


@dataclass(frozen=True)
class Windows:
    """Attribution window per credited event type, and how late (event time) a record may arrive."""

    click_ms: int
    add_to_cart_ms: int
    purchase_ms: int
    max_lateness_ms: int
    clock_skew_ms: int = 0
    """How far ahead of the consumer's clock a record may move the user's watermark."""

    def of(self, kind: EventType) -> int:
        return {EventType.CLICK: self.click_ms, EventType.ADD_TO_CART: self.add_to_cart_ms,
                EventType.PURCHASE: self.purchase_ms}[kind]

    @property
    def longest_ms(self) -> int:
        return max(self.click_ms, self.add_to_cart_ms, self.purchase_ms)


@dataclass
class StoredExposure:
    """What the join keeps of an exposure while events may still credit it."""

    request_id: str
    ts_ms: int
    experiment: str
    revision: int
    variant: str
    items: tuple[str, ...]
    slots: tuple[str, ...] = ()
    """Interleaving: the team of each slot; empty in A/B mode."""
    team_clicks: dict[str, int] = field(default_factory=dict)
    """Interleaving: credited clicks per team on this exposure (for its win/tie verdict)."""

    @property
    def key(self) -> RowKey:
        return (self.experiment, self.revision)

    def to_json(self) -> str:
        return json.dumps([self.ts_ms, self.experiment, self.revision, self.variant, self.items, self.slots, self.team_clicks],
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, request_id: str, raw: str | bytes) -> StoredExposure:
        ts, experiment, revision, variant, items, slots, team_clicks = json.loads(raw)
        return cls(request_id, ts, experiment, revision, variant, tuple(items), tuple(slots), dict(team_clicks))

    @classmethod
    def of(cls, exposure: Exposure) -> StoredExposure:
        interleaved = exposure.mode == INTERLEAVE and bool(exposure.slot_variants)
        return cls(exposure.request_id, exposure.ts_ms, exposure.experiment, exposure.revision, exposure.variant,
                   tuple(exposure.item_ids), tuple(exposure.slot_variants) if interleaved else ())

    def matches(self, event: PendingEvent, windows: Windows) -> bool:
        return event.item_id in self.items and self.ts_ms <= event.ts_ms <= self.ts_ms + windows.of(event.type)

    def rank(self) -> tuple[int, str]:
        return (self.ts_ms, self.request_id)


@dataclass
class PendingEvent:
    """A creditable event kept while a late exposure may still take (or move) its credit."""

    event_id: str
    item_id: str
    type: EventType
    ts_ms: int
    credited: str = ""
    """request_id of the exposure it credits ("" = none yet)."""

    def to_json(self) -> str:
        return json.dumps([self.item_id, self.type.value, self.ts_ms, self.credited], separators=(",", ":"))

    @classmethod
    def from_json(cls, event_id: str, raw: str | bytes) -> PendingEvent:
        item, kind, ts, credited = json.loads(raw)
        return cls(event_id, item, EventType(kind), ts, credited)


@dataclass
class Row:
    """The user's (experiment, revision) membership: the variant kept, and the first exposure's event time."""

    variant: str
    first_ts_ms: int


@dataclass
class UserState:
    """One user's join state as stored, plus which of the batch's ids the store has already seen."""

    user_id: str
    exposures: dict[str, StoredExposure] = field(default_factory=dict)
    pending: dict[str, PendingEvent] = field(default_factory=dict)
    rows: dict[RowKey, Row] = field(default_factory=dict)
    watermark_ms: int = 0
    """The newest event time of any record of this user processed so far."""
    seen_events: set[str] = field(default_factory=set)
    seen_requests: set[str] = field(default_factory=set)


@dataclass
class UserChanges:
    """What one batch changes for one user: state to write, counts to add, and verdicts for metrics."""

    user_id: str
    put_exposures: dict[str, StoredExposure] = field(default_factory=dict)
    del_exposures: set[str] = field(default_factory=set)
    put_pending: dict[str, PendingEvent] = field(default_factory=dict)
    del_pending: set[str] = field(default_factory=set)
    put_rows: dict[RowKey, Row] = field(default_factory=dict)
    watermark_ms: int = 0
    new_events: dict[str, int] = field(default_factory=dict)
    """event_id → ts_ms of the events seen for the first time (the dedupe set and the pre_events count)."""
    new_requests: dict[str, int] = field(default_factory=dict)
    row_deltas: dict[RowKey, Counter] = field(default_factory=lambda: defaultdict(Counter))
    """UserOutcome fields to add to: exposures, impressions, clicks, add_to_carts, purchases."""
    interleaved_deltas: dict[RowKey, Counter] = field(default_factory=lambda: defaultdict(Counter))
    """Interleaving fields to add to: exposures, clicks:<team>, wins:<team>, ties."""
    teams: dict[RowKey, set[str]] = field(default_factory=lambda: defaultdict(set))
    recount_pre_events: dict[RowKey, int] = field(default_factory=dict)
    """Rows whose pre_events must be recounted: events strictly before this event time."""
    exposure_verdicts: list[tuple[Exposure, str]] = field(default_factory=list)
    event_verdicts: list[tuple[Event, str]] = field(default_factory=list)
    credits: list[tuple[str, str, EventType]] = field(default_factory=list)
    """(experiment, variant, type) of each event credited for the first time."""
    recredits: int = 0
    """Credits moved to a better (later-arriving) exposure."""


def verdict(team_clicks: dict[str, int]) -> str | None:
    """An exposure's interleaving verdict: "wins:<team>", "ties", or None without clicks."""
    total = sum(team_clicks.values())
    if total <= 0:
        return None
    best = max(team_clicks.values())
    leaders = [team for team, n in team_clicks.items() if n == best]
    return f"wins:{leaders[0]}" if len(leaders) == 1 else "ties"


class _Join:
    def __init__(self, state: UserState, windows: Windows, now_ms: int) -> None:
        self.s = state
        self.w = windows
        self.c = UserChanges(state.user_id, watermark_ms=state.watermark_ms)
        self.watermark_cap_ms = now_ms + windows.clock_skew_ms

    def _advance(self, ts_ms: int) -> None:
        self.c.watermark_ms = max(self.c.watermark_ms, min(ts_ms, self.watermark_cap_ms))

    def exposure(self, exposure: Exposure) -> None:
        s, c = self.s, self.c
        if exposure.request_id in s.seen_requests or exposure.request_id in c.new_requests:
            c.exposure_verdicts.append((exposure, DUPLICATE))
            return
        c.new_requests[exposure.request_id] = exposure.ts_ms
        self._advance(exposure.ts_ms)
        x = StoredExposure.of(exposure)
        row = s.rows.get(x.key)
        if row is not None and row.variant != x.variant:
            c.exposure_verdicts.append((exposure, CONFLICT))
            return
        if row is None or x.ts_ms < row.first_ts_ms:
            row = s.rows[x.key] = Row(row.variant if row else x.variant, x.ts_ms)
            c.put_rows[x.key] = row
            c.recount_pre_events[x.key] = row.first_ts_ms
        deltas = c.row_deltas[x.key]
        deltas["exposures"] += 1
        deltas["impressions"] += len(x.items)
        if x.slots:
            c.interleaved_deltas[x.key]["exposures"] += 1
            c.teams[x.key].update(x.slots)
        s.exposures[x.request_id] = x
        c.put_exposures[x.request_id] = x
        c.exposure_verdicts.append((exposure, APPLIED))
        for pending in sorted(s.pending.values(), key=lambda p: p.event_id):
            if x.matches(pending, self.w):
                current = s.exposures.get(pending.credited) if pending.credited else None
                if pending.credited and current is None:
                    continue  # its exposure was forgotten: the credit stays where it is (cannot happen within the horizons)
                if current is None or x.rank() > current.rank():
                    self._move(pending, current, x)

    def event(self, event: Event) -> None:
        s, c = self.s, self.c
        if event.event_id in s.seen_events or event.event_id in c.new_events:
            c.event_verdicts.append((event, DUPLICATE))
            return
        c.new_events[event.event_id] = event.ts_ms
        self._advance(event.ts_ms)
        for key, row in s.rows.items():
            if event.ts_ms < row.first_ts_ms:
                c.recount_pre_events[key] = row.first_ts_ms
        if event.type not in CREDITED:
            c.event_verdicts.append((event, NOT_CREDITABLE))
            return
        pending = PendingEvent(event.event_id, event.item_id, event.type, event.ts_ms)
        best = max((x for x in s.exposures.values() if x.matches(pending, self.w)), key=StoredExposure.rank, default=None)
        if best is not None:
            self._move(pending, None, best)
        s.pending[pending.event_id] = pending
        c.put_pending[pending.event_id] = pending
        c.event_verdicts.append((event, CREDITED_NOW if best is not None else BUFFERED))

    def _move(self, pending: PendingEvent, old: StoredExposure | None, new: StoredExposure) -> None:
        if old is not None:
            self._count(pending, old, -1)
            self.c.recredits += 1
        else:
            self.c.credits.append((new.experiment, new.variant, pending.type))
        self._count(pending, new, +1)
        pending.credited = new.request_id
        self.c.put_pending[pending.event_id] = pending

    def _count(self, pending: PendingEvent, x: StoredExposure, sign: int) -> None:
        c = self.c
        c.row_deltas[x.key][CREDITED[pending.type]] += sign
        if x.slots and pending.type == EventType.CLICK:
            team = x.slots[x.items.index(pending.item_id)]
            before = verdict(x.team_clicks)
            x.team_clicks[team] = x.team_clicks.get(team, 0) + sign
            after = verdict(x.team_clicks)
            deltas = c.interleaved_deltas[x.key]
            deltas[f"clicks:{team}"] += sign
            if before != after:
                if before:
                    deltas[before] -= 1
                if after:
                    deltas[after] += 1
            c.put_exposures[x.request_id] = x

    def prune(self) -> None:
        """Forget what can no longer change a credit: events beyond `max_lateness` behind the user's newest
        record, exposures beyond the longest window plus `max_lateness` (never before the events they credit)."""
        s, c = self.s, self.c
        event_horizon = c.watermark_ms - self.w.max_lateness_ms
        exposure_horizon = event_horizon - self.w.longest_ms
        for event_id in [e for e, p in s.pending.items() if p.ts_ms < event_horizon]:
            del s.pending[event_id]
            c.put_pending.pop(event_id, None)
            c.del_pending.add(event_id)
        for request_id in [r for r, x in s.exposures.items() if x.ts_ms < exposure_horizon]:
            del s.exposures[request_id]
            c.put_exposures.pop(request_id, None)
            c.del_exposures.add(request_id)


def attribute(state: UserState, records: list[Exposure | Event], windows: Windows, now_ms: int) -> UserChanges:
    """Join one user's batch (in arrival order) into `state` (mutated) and return the changes to store.
    `now_ms`: the consumer's wall clock; the user's watermark stays at or below `now_ms + windows.clock_skew_ms`."""
    join = _Join(state, windows, now_ms)
    for record in records:
        if isinstance(record, Exposure):
            join.exposure(record)
        else:
            join.event(record)
    join.prune()
    join.c.recount_pre_events = {key: state.rows[key].first_ts_ms for key in join.c.recount_pre_events}
    return join.c
