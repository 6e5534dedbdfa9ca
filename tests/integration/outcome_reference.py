"""The attribution rule in plain Python, written from docs/experiments.md ("Attribution") without the service's
code: all records known at once, so no buffering, no arrival order, no state. Tests compare the service's
rows in Redis with this on the same exposures and events.

Two parts of the rule depend on arrival, and the reference models them for the way the tests publish:

* **The lateness horizon** (`max_lateness_ms`): an event is kept for crediting only while it is at most
  `max_lateness` (event time) behind the newest record of its user. The tests publish every event first and
  wait until it is joined, then the exposures (each user's in time order), so an event more than
  `max_lateness` behind its user's newest *event* was forgotten before any exposure could take it: it is
  credited to nothing. (Later exposures cannot forget an event a better exposure still needs: a user's
  exposures arrive in time order, and only one newer than the event by more than `max_lateness` moves the
  watermark that far.) `None`: no horizon.
* **Variant conflicts**: per (experiment, revision) a user keeps the variant of their first exposure (time
  order, ties by publishing order); an exposure in another variant is counted as a conflict, never stored
  nor credited.

Valid while no user's records span more than the dedupe window (tests keep their data within hours) and
every event time is in the past (the watermark's clock cap never binds).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from vitrine.contracts.events import Event
from vitrine.contracts.outcomes import InterleavedOutcome, UserOutcome


@dataclass(frozen=True)
class Expected:
    users: dict[tuple[str, int], list[UserOutcome]]
    """(experiment, revision) → rows sorted by user."""
    interleaved: dict[tuple[str, int], list[InterleavedOutcome]]
    revisions: dict[str, list[int]]
    conflicts: int = 0
    """Exposures in another variant than the user's first in the same revision."""
    forgotten: int = 0
    """Creditable events that were beyond the horizon when the exposures came (0 without one)."""


def compute(exposures: list, events: list[Event], windows_ms: dict[str, int],  # noqa: C901 - one readable pass
            max_lateness_ms: int | None = None) -> Expected:
    """`exposures`: `Exposure` records (duplicates allowed), `events`: events (duplicates allowed);
    `windows_ms`: event type value → attribution window in milliseconds ("click", "add_to_cart", "purchase");
    `max_lateness_ms`: the service's lateness horizon (events joined before exposures), None for none."""
    unique_x = {}
    for x in exposures:
        unique_x.setdefault(x.request_id, x)
    unique_e = {}
    for e in events:
        unique_e.setdefault(e.event_id, e)

    # Variant conflicts: the first exposure (time order, then publishing order) of a user in a revision sets the variant.
    first_variant: dict[tuple[str, int, str], str] = {}
    conflicts = 0
    for order, x in sorted(enumerate(unique_x.values()), key=lambda item: (item[1].ts_ms, item[0])):
        kept = first_variant.setdefault((x.experiment, x.revision, x.user_id), x.variant)
        if kept != x.variant:
            conflicts += 1
            del unique_x[x.request_id]

    # The horizon: events more than max_lateness behind their user's newest event are forgotten before exposures come.
    newest: dict[str, int] = {}
    for e in unique_e.values():
        newest[e.user_id] = max(newest.get(e.user_id, e.ts_ms), e.ts_ms)
    creditable = {event_id: e for event_id, e in unique_e.items()
                  if max_lateness_ms is None or e.ts_ms >= newest[e.user_id] - max_lateness_ms}

    # The credit: the latest exposure (ties: larger request_id) of the same user that showed the item, with
    # the event inside [exposure time, exposure time + window of its type].
    credit: dict[str, str] = {}
    forgotten = 0
    for e in unique_e.values():
        window = windows_ms.get(e.type.value)
        if window is None:
            continue
        candidates = [x for x in unique_x.values()
                      if x.user_id == e.user_id and e.item_id in x.item_ids and x.ts_ms <= e.ts_ms <= x.ts_ms + window]
        if candidates and e.event_id not in creditable:
            forgotten += 1
        elif candidates:
            credit[e.event_id] = max(candidates, key=lambda x: (x.ts_ms, x.request_id)).request_id

    field = {"click": "clicks", "add_to_cart": "add_to_carts", "purchase": "purchases"}
    rows: dict[tuple[str, int], dict[str, dict]] = defaultdict(dict)
    for x in sorted(unique_x.values(), key=lambda x: x.ts_ms):
        row = rows[(x.experiment, x.revision)].setdefault(x.user_id, {
            "variant": x.variant, "exposures": 0, "impressions": 0, "clicks": 0, "add_to_carts": 0, "purchases": 0, "first": x.ts_ms})
        assert row["variant"] == x.variant
        row["exposures"] += 1
        row["impressions"] += len(x.item_ids)
    for event_id, request_id in credit.items():
        x, e = unique_x[request_id], unique_e[event_id]
        rows[(x.experiment, x.revision)][x.user_id][field[e.type.value]] += 1

    users = {}
    for key, by_user in rows.items():
        users[key] = [
            UserOutcome(user_id=user, variant=r["variant"], exposures=r["exposures"], impressions=r["impressions"], clicks=r["clicks"],
                        add_to_carts=r["add_to_carts"], purchases=r["purchases"],
                        pre_events=sum(1 for e in unique_e.values() if e.user_id == user and e.ts_ms < r["first"]))
            for user, r in sorted(by_user.items())
        ]

    # Interleaving: clicks on the team that filled the slot; per exposure with clicks, the team with more wins.
    interleaved = {}
    for key in rows:
        shown = [x for x in unique_x.values() if (x.experiment, x.revision) == key and x.mode == "interleave"]
        if not shown:
            continue
        team_a, team_b = sorted({t for x in shown for t in x.slot_variants})[:2]
        per_user: dict[str, dict[str, int]] = {}
        for x in shown:
            counts = per_user.setdefault(x.user_id, {"clicks_a": 0, "clicks_b": 0, "wins_a": 0, "wins_b": 0, "ties": 0})
            a = b = 0
            for event_id, request_id in credit.items():
                e = unique_e[event_id]
                if request_id == x.request_id and e.type.value == "click":
                    team = x.slot_variants[x.item_ids.index(e.item_id)]
                    a += team == team_a
                    b += team == team_b
            counts["clicks_a"] += a
            counts["clicks_b"] += b
            if a or b:
                counts["wins_a" if a > b else "wins_b" if b > a else "ties"] += 1
        interleaved[key] = [InterleavedOutcome(user_id=user, team_a=team_a, team_b=team_b, **c) for user, c in sorted(per_user.items())]

    revisions: dict[str, list[int]] = defaultdict(list)
    for experiment, revision in sorted(rows):
        revisions[experiment].append(revision)
    return Expected(users=dict(users), interleaved=interleaved, revisions=dict(revisions), conflicts=conflicts, forgotten=forgotten)
