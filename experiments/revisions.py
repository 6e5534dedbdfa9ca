"""One experiment across its revisions: which revisions form one test, and each user's pooled row.

Every change of an experiment (`vitrine ab set`, a rollout step) is a new *revision*, and the outcome
service keeps one row per user and revision. Statistics that restart at every revision break their own
promises: a ramp 10 % → 25 % → 50 % would get three α budgets, and CUPED's "pre-period" of a user in
revision 2 would contain her exposure in revision 1. So the analysis spans revisions:

* **A phase** is the run of consecutive revisions that test the same hypothesis: the same variants with the
  same models and versions, in the same mode, randomised with the same salt. Weight changes (ramps, pauses at
  0 %) stay in the phase; a change of what a variant serves, or a new salt (every user re-randomised), starts a
  new phase — a new question, with its own α.
* **A user's pooled row** starts in the first phase revision she was exposed in (her *entry revision*, the
  stratum she is compared in: she was randomised with that revision's weights) and adds her rows of later
  phase revisions while she keeps the same variant. A ramp moves some users' buckets to another variant;
  their rows from then on are left out (censored at reassignment: which users move depends only on the hash,
  never on outcomes, so no bias enters).
* **CUPED's covariate** is the user's `pre_events` in her *first revision of the whole experiment*: events
  before her first exposure to any variant of it. If a revision that had rows has lost them (expired), first
  exposures are unknown and CUPED is refused with that reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from vitrine.contracts.outcomes import METRICS, InterleavedOutcome, UserOutcome


@dataclass(frozen=True)
class RevisionConfig:
    """What an experiment revision tested: its arms (name, model, version), mode and split."""

    revision: int
    mode: str
    arms: tuple[tuple[str, str, str], ...]
    weights: dict[str, int]
    salt: str = ""

    @classmethod
    def of(cls, experiment) -> RevisionConfig:  # noqa: ANN001 - services.gateway.experiment.Experiment (no import cycle)
        return cls(experiment.revision, experiment.mode,
                   tuple((v.name, v.model_name, v.model_version) for v in experiment.variants),
                   {v.name: v.weight for v in experiment.variants}, experiment.salt)

    def same_hypothesis(self, other: RevisionConfig) -> bool:
        return (self.mode, self.arms, self.salt) == (other.mode, other.arms, other.salt)


def phase(configs: Mapping[int, RevisionConfig], current: int) -> list[int]:
    """The revisions of the phase that ends at `current`, ascending: walk back while the hypothesis is the same.

    A revision whose configuration is unknown (not in `configs`) ends the walk: sameness cannot be shown."""
    if current not in configs:
        return [current]
    revisions = [current]
    while revisions[0] - 1 in configs and configs[revisions[0] - 1].same_hypothesis(configs[current]):
        revisions.insert(0, revisions[0] - 1)
    return revisions


@dataclass
class Pooled:
    """Rows ready for `analysis.analyse`: one per user, the stratum (entry revision) of each, and CUPED's status."""

    rows: list[UserOutcome] = field(default_factory=list)
    strata: list[int] = field(default_factory=list)
    covariate_refused: str = ""
    censored_users: int = 0
    """Users whose variant changed within the phase (their rows after the change are left out)."""


def pool(rows_by_revision: Mapping[int, Sequence[UserOutcome]], phase_revisions: Sequence[int],
         revisions_with_rows: Sequence[int] = ()) -> Pooled:
    """Pool the phase's rows per user (see the module docstring).

    rows_by_revision: every revision of the experiment whose rows were read (earlier phases too: they hold
        the users' first exposures); revisions_with_rows: every revision the store lists as having had rows.
    """
    in_phase = sorted(phase_revisions)
    first_of_all = sorted(rows_by_revision)
    lost = sorted(r for r in revisions_with_rows if r <= in_phase[-1] and not rows_by_revision.get(r))
    covariate: dict[str, int] = {}
    for revision in first_of_all:
        for row in rows_by_revision[revision]:
            covariate.setdefault(row.user_id, row.pre_events)
    pooled = Pooled(covariate_refused=(f"the rows of revision(s) {', '.join(map(str, lost))} are gone (expired), so users' first "
                                       "exposures in the experiment are unknown") if lost else "")
    by_user: dict[str, UserOutcome] = {}
    entry: dict[str, int] = {}
    closed: set[str] = set()
    for revision in in_phase:
        for row in rows_by_revision.get(revision, ()):
            user = row.user_id
            if user in closed:
                continue
            if user not in by_user:
                by_user[user] = replace(row, pre_events=covariate.get(user, row.pre_events))
                entry[user] = revision
            elif by_user[user].variant != row.variant:
                closed.add(user)
            else:
                kept = by_user[user]
                by_user[user] = replace(kept, **{name: getattr(kept, name) + getattr(row, name) for name in ("exposures", *METRICS)})
    pooled.censored_users = len(closed)
    for user in sorted(by_user):
        pooled.rows.append(by_user[user])
        pooled.strata.append(entry[user])
    return pooled


def pool_interleaved(rows_by_revision: Mapping[int, Sequence[InterleavedOutcome]], phase_revisions: Sequence[int]) -> list[InterleavedOutcome]:
    """Each user's interleaving counts summed over the phase (every user sees both teams: no strata needed);
    teams are matched by name, so a revision that lists them the other way round is turned round."""
    by_user: dict[str, InterleavedOutcome] = {}
    for revision in sorted(phase_revisions):
        for row in rows_by_revision.get(revision, ()):
            kept = by_user.get(row.user_id)
            if kept is None:
                by_user[row.user_id] = row
                continue
            if (row.team_a, row.team_b) != (kept.team_a, kept.team_b):
                row = InterleavedOutcome(row.user_id, row.team_b, row.team_a, row.clicks_b, row.clicks_a, row.wins_b, row.wins_a, row.ties)
            by_user[row.user_id] = InterleavedOutcome(
                row.user_id, kept.team_a, kept.team_b, kept.clicks_a + row.clicks_a, kept.clicks_b + row.clicks_b,
                kept.wins_a + row.wins_a, kept.wins_b + row.wins_b, kept.ties + row.ties)
    return [by_user[u] for u in sorted(by_user)]
