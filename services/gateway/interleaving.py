"""Team-draft interleaving: two rankers' lists merged into one, each slot owned by the team that placed it.

Radlinski, Kurup, Joachims, "How does clickthrough data reflect retrieval quality?", CIKM 2008, §4
(team-draft): in each round the team with fewer picks so far — a coin flip when even — adds its
highest-ranked item not yet in the merged list. A click on a slot is credit for the team that owns
it; the outcome service turns credits into per-user preferences and the report tests them.

The coin is seeded from the request, so an answer can be reproduced from its exposure record.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

Ranked = Sequence[tuple[str, float]]


def team_draft(a: Ranked, b: Ranked, k: int, seed: str, teams: tuple[str, str]) -> list[tuple[str, float, str]]:
    """Merge `a` and `b` (best first) into at most `k` distinct items, each with its score and owning team."""
    rng = random.Random(seed)
    merged: list[tuple[str, float, str]] = []
    taken: set[str] = set()
    cursors = [0, 0]
    lists = (a, b)
    picks = [0, 0]
    while len(merged) < k:
        if picks[0] != picks[1]:
            turn = 0 if picks[0] < picks[1] else 1
        else:
            turn = rng.randrange(2)
        for team in (turn, 1 - turn):  # the team whose turn it is, or the other when it has run out
            ranked, cursor = lists[team], cursors[team]
            while cursor < len(ranked) and ranked[cursor][0] in taken:
                cursor += 1
            cursors[team] = cursor
            if cursor < len(ranked):
                item, score = ranked[cursor]
                merged.append((item, score, teams[team]))
                taken.add(item)
                picks[team] += 1
                break
        else:
            break  # both lists exhausted
    return merged
