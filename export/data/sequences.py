"""From events to next-item training data, split by time without leakage.

- A user's events become *steps*: consecutive events on the same item collapse into one step carrying
  the strongest event type (a view followed by its click and cart is one step, not three), so that the
  task is "what will they look at next", not "will they click what they just viewed".
- The split is by time: steps before the cutoff (the `1 - validation_fraction` quantile of event
  times) train, later steps are validation targets. The vocabulary holds only items seen before the
  cutoff; later-only items map to the out-of-vocabulary id, exactly as they would in serving.
- Validation histories may include earlier validation steps (that is what the user did before), but
  no parameter was fitted on anything at or after the cutoff.

Model inputs share one encoding with serving (`encode_history`): ids 0 = padding, 1 = unknown item,
items from 2; histories are left-padded to `max_len` so that the most recent step is last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from vitrine.export.data.table import EventTable

PAD = 0
OOV = 1
FIRST_ITEM = 2


@dataclass(frozen=True)
class Vocabulary:
    item_ids: tuple[str, ...]
    """Item id of model index FIRST_ITEM + i, most popular first."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {item: i + FIRST_ITEM for i, item in enumerate(self.item_ids)})

    @property
    def size(self) -> int:
        """Rows of the model's item table: padding, unknown, then the items."""
        return len(self.item_ids) + FIRST_ITEM

    def index(self, item_id: str) -> int:
        return self._index.get(item_id, OOV)  # type: ignore[attr-defined]

    def indices(self, item_ids: np.ndarray) -> np.ndarray:
        lookup = self._index  # type: ignore[attr-defined]
        return np.fromiter((lookup.get(i, OOV) for i in item_ids.tolist()), dtype=np.int64, count=len(item_ids))


@dataclass(frozen=True)
class Steps:
    """Collapsed steps of all users, grouped by user in time order."""

    user_start: np.ndarray
    """Offsets: user u's steps are [user_start[u], user_start[u+1])."""
    item: np.ndarray
    type: np.ndarray
    """Event type index + 1 (0 is padding), as the models take it."""
    ts_ms: np.ndarray
    raw_item: np.ndarray | None = None
    """The item id of each step (strings), beside its model index."""


@dataclass(frozen=True)
class Dataset:
    vocabulary: Vocabulary
    cutoff_ms: int
    train_inputs: np.ndarray
    """[N, L] item ids, left-padded."""
    train_types: np.ndarray
    train_targets: np.ndarray
    """[N, L] next item at every position (0 where there is none)."""
    valid_inputs: np.ndarray
    valid_types: np.ndarray
    valid_targets: np.ndarray
    """[M] the item that came next."""
    train_item_counts: np.ndarray
    """[vocabulary.size] training interactions per item: the popularity baseline."""
    max_len: int
    valid_returning: np.ndarray | None = None
    """[M] True where the shopper had steps before the cutoff (a returning shopper), False for a new one."""
    valid_target_ids: np.ndarray | None = None
    """[M] the raw item id of each target (also for targets outside the vocabulary): category slices need it."""
    valid_target_category: np.ndarray | None = field(default=None)
    """[M] category of each target ("" = unknown), set by whoever knows the catalogue (the pipeline)."""


def collapse(table: EventTable, vocabulary: Vocabulary) -> Steps:
    """Per user, in time order, merge runs of events on one item into one step with the strongest type."""
    order = np.lexsort((table.ts_ms, table.user_id))
    users, items = table.user_id[order], vocabulary.indices(table.item_id[order])
    kinds, times = table.type[order].astype(np.int64) + 1, table.ts_ms[order]
    raw_items = table.item_id[order]
    new_user = np.ones(len(order), dtype=bool)
    new_user[1:] = users[1:] != users[:-1]
    new_step = new_user.copy()
    new_step[1:] |= raw_items[1:] != raw_items[:-1]
    step_of_event = np.cumsum(new_step) - 1
    starts = np.flatnonzero(new_step)
    step_type = np.zeros(len(starts), dtype=np.int64)
    np.maximum.at(step_type, step_of_event, kinds)
    user_start = np.append(np.flatnonzero(new_user[starts]), len(starts))
    return Steps(user_start=user_start, item=items[starts], type=step_type, ts_ms=times[starts], raw_item=raw_items[starts])


def collapse_runs(items: Sequence[str], types: Sequence[int]) -> tuple[list[str], list[int]]:
    """One user's time-ordered events → steps: a run on one item becomes one step with the strongest
    type. The serving-side twin of `collapse` (tests check that both agree)."""
    out_items: list[str] = []
    out_types: list[int] = []
    for item, kind in zip(items, types, strict=True):
        if out_items and out_items[-1] == item:
            out_types[-1] = max(out_types[-1], kind)
        else:
            out_items.append(item)
            out_types.append(kind)
    return out_items, out_types


def encode_history(items: list[int], types: list[int], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad (or cut to the most recent) `max_len` steps: the one encoding used in training and serving."""
    items, types = items[-max_len:], types[-max_len:]
    pad = max_len - len(items)
    return (
        np.array([PAD] * pad + list(items), dtype=np.int64),
        np.array([PAD] * pad + list(types), dtype=np.int64),
    )


def build(
    table: EventTable,
    max_len: int = 20,
    validation_fraction: float = 0.1,
    max_validation: int = 20_000,
    seed: int = 0,
) -> Dataset:
    if not 0 < validation_fraction < 1:
        raise ValueError("validation_fraction must lie in (0, 1)")
    if len(table) < 10:
        raise ValueError(f"{len(table)} events are too few to train on")
    cutoff = int(np.quantile(table.ts_ms, 1 - validation_fraction))
    train_mask = table.ts_ms < cutoff
    train_items, counts = np.unique(table.item_id[train_mask], return_counts=True)
    by_popularity = np.lexsort((train_items, -counts))
    vocabulary = Vocabulary(tuple(train_items[by_popularity].tolist()))
    item_counts = np.zeros(vocabulary.size, dtype=np.int64)
    item_counts[FIRST_ITEM:] = counts[by_popularity]

    steps = collapse(table, vocabulary)
    train_in, train_ty, train_tg, valid_in, valid_ty, valid_tg = [], [], [], [], [], []
    valid_returning: list[bool] = []
    valid_ids: list[str] = []
    for u in range(len(steps.user_start) - 1):
        lo, hi = steps.user_start[u], steps.user_start[u + 1]
        items, kinds, times = steps.item[lo:hi], steps.type[lo:hi], steps.ts_ms[lo:hi]
        n_train = int(np.searchsorted(times, cutoff))
        # Training windows of max_len inputs + 1 target, from the most recent backwards.
        end = n_train
        while end >= 2:
            start = max(0, end - max_len - 1)
            window_items, window_types = items[start:end], kinds[start:end]
            x, t = encode_history(list(window_items[:-1]), list(window_types[:-1]), max_len)
            y, _ = encode_history(list(window_items[1:]), list(window_types[1:]), max_len)
            train_in.append(x)
            train_ty.append(t)
            train_tg.append(y)
            end = start + 1 if start > 0 else 0
        for position in range(max(n_train, 1), len(items)):
            x, t = encode_history(list(items[:position]), list(kinds[:position]), max_len)
            valid_in.append(x)
            valid_ty.append(t)
            valid_tg.append(items[position])
            valid_returning.append(n_train > 0)
            valid_ids.append(str(steps.raw_item[lo + position]))  # type: ignore[index]
    if not train_in or not valid_tg:
        raise ValueError("the time split left no training windows or no validation targets")
    valid = (np.stack(valid_in), np.stack(valid_ty), np.array(valid_tg, dtype=np.int64),
             np.array(valid_returning, dtype=bool), np.array(valid_ids, dtype=str))
    if len(valid[2]) > max_validation:
        keep = np.sort(np.random.default_rng(seed).choice(len(valid[2]), size=max_validation, replace=False))
        valid = tuple(v[keep] for v in valid)  # type: ignore[assignment]
    return Dataset(
        vocabulary=vocabulary,
        cutoff_ms=cutoff,
        train_inputs=np.stack(train_in),
        train_types=np.stack(train_ty),
        train_targets=np.stack(train_tg),
        valid_inputs=valid[0],
        valid_types=valid[1],
        valid_targets=valid[2],
        valid_returning=valid[3],
        valid_target_ids=valid[4],
        train_item_counts=item_counts,
        max_len=max_len,
    )
