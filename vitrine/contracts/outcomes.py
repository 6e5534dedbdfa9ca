"""What the outcome service hands to the analysis: one row per user and experiment revision.

The user is the unit of randomisation, so the unit of analysis: every statistic in `vitrine ab
report` (means, delta-method ratios, CUPED, sequential tests, SRM) is computed from these rows.
The outcome service (`services/outcomes/store.py`) owns where they live; this is their shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, get_args

METRICS: Final = ("impressions", "clicks", "add_to_carts", "purchases")
AnalysedMetric = Literal["impressions_per_user", "ctr", "conversion", "purchases_per_user"]
"""The metrics `vitrine ab report` analyses from these rows (`experiments.analysis.METRICS` defines each)."""
ANALYSED_METRICS: Final = get_args(AnalysedMetric)


@dataclass(frozen=True)
class UserOutcome:
    """One user's counts in one (experiment, revision), attributed to the variant they were shown."""

    user_id: str
    variant: str
    exposures: int
    """Answers served to the user in this revision."""
    impressions: int
    """Items shown (slots), summed over exposures."""
    clicks: int
    add_to_carts: int
    purchases: int
    pre_events: int = 0
    """The user's events before their first exposure in this revision (CUPED covariate; 0 if none seen)."""


@dataclass(frozen=True)
class InterleavedOutcome:
    """One user's interleaving results: attributed clicks on each team's slots, and per-exposure verdicts."""

    user_id: str
    team_a: str
    team_b: str
    clicks_a: int
    clicks_b: int
    wins_a: int
    """Exposures where team A's slots got more attributed clicks than team B's."""
    wins_b: int
    ties: int
    """Exposures with clicks on both teams in equal number (exposures without any click are not counted)."""
