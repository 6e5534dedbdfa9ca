"""The attribution rule in plain Python, written from docs/experiments.md ("Attribution") without the service's
code: all records known at once, so no buffering, no arrival order, no state. Tests compare the service's
rows in Redis with this on the same exposures and events.

Valid while no user's records span more than the service's `max_lateness` and dedupe window (tests keep
their data within hours and configure a long lateness), and no user changes variant within a revision.
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


def compute(exposures: list, events: list[Event], windows_ms: dict[str, int]) -> Expected:  # noqa: C901 - one readable pass
    """`exposures`: `Exposure` records (duplicates allowed), `events`: events (duplicates allowed);
    `windows_ms`: event type value → attribution window in milliseconds ("click", "add_to_cart", "purchase")."""
    unique_x = {}
    for x in exposures:
        unique_x.setdefault(x.request_id, x)
    unique_e = {}
    for e in events:
        unique_e.setdefault(e.event_id, e)

    # The credit: the latest exposure (ties: larger request_id) of the same user that showed the item, with
    # the event inside [exposure time, exposure time + window of its type].
    credit: dict[str, str] = {}
    for e in unique_e.values():
        window = windows_ms.get(e.type.value)
        if window is None:
            continue
        candidates = [x for x in unique_x.values()
                      if x.user_id == e.user_id and e.item_id in x.item_ids and x.ts_ms <= e.ts_ms <= x.ts_ms + window]
        if candidates:
            credit[e.event_id] = max(candidates, key=lambda x: (x.ts_ms, x.request_id)).request_id

    field = {"click": "clicks", "add_to_cart": "add_to_carts", "purchase": "purchases"}
    rows: dict[tuple[str, int], dict[str, dict]] = defaultdict(dict)
    for x in sorted(unique_x.values(), key=lambda x: x.ts_ms):
        row = rows[(x.experiment, x.revision)].setdefault(x.user_id, {
            "variant": x.variant, "exposures": 0, "impressions": 0, "clicks": 0, "add_to_carts": 0, "purchases": 0, "first": x.ts_ms})
        assert row["variant"] == x.variant, "the reference does not model users who change variant"
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
    return Expected(users=dict(users), interleaved=interleaved, revisions=dict(revisions))
