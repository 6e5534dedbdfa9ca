"""Strong simple baselines, scored on the same `Dataset`, split, vocabulary and metrics as the models.

A neural model is worth serving only if it beats what counting can do. Three counters, from weakest
to strongest on session-shaped data:

- `popularity`: every shopper gets the most trained-on items.
- `transitions`: first-order item-to-item — every item scored by how often it directly followed the
  shopper's last item in the training windows.
- `cooccurrence`: a session-kNN over the recent history — each of the last `window` steps votes for
  the items that followed it within `follow_span` steps in training, its vote weighted by
  decay^(distance from the end) (and a pair `g` steps apart by decay^(g-1)). With window 1 and span 1
  it is exactly `transitions`.

All counts come from the training windows only (never from validation), and every ranking breaks ties
by popularity: the vocabulary is ordered most trained-on first, so a stable sort on the column index
is a popularity tie-break. A shopper whose last item never had a successor therefore gets popularity,
which is what a shop would show.

Implementation: co-occurrence tables are `scipy.sparse` matrices, a batch of histories is a sparse
matrix of decayed votes, and scores are one sparse product per batch — seconds on the default preset.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp

from vitrine.export.data.sequences import FIRST_ITEM, Dataset
from vitrine.export.metrics import METRIC_NAMES, SlicedMetrics, batches

BLOCKED = -np.inf
"""Primary score of padding and the unknown item: ranked after every real item."""


@dataclass(frozen=True)
class BaselineConfig:
    """How the baselines are built and which metric names the strongest one."""

    window: int = 5
    """History steps (most recent first) that vote in the co-occurrence baseline."""
    decay: float = 0.5
    """Vote weight of a step `d` steps before the last one: decay**d."""
    follow_span: int = 1
    """A training step counts as following an item when it came at most this many steps after it."""
    metric: str = "recall@10"
    """The metric by which the strongest baseline is chosen (and the gate compares)."""

    def __post_init__(self) -> None:
        if self.window < 1 or self.follow_span < 1:
            raise ValueError("window and follow_span must be >= 1")
        if not 0 < self.decay <= 1:
            raise ValueError("decay must lie in (0, 1]")
        if self.metric not in METRIC_NAMES:
            raise ValueError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRIC_NAMES)}")


class Baseline(ABC):
    """A fitted counter: `primary` scores per item, `scores` the same with ties broken by popularity."""

    name: str

    @abstractmethod
    def primary(self, inputs: np.ndarray) -> np.ndarray:
        """[B, vocabulary.size] float64 scores for left-padded histories [B, L]; BLOCKED below FIRST_ITEM."""

    def scores(self, inputs: np.ndarray) -> np.ndarray:
        """Scores whose order is `primary`'s with ties broken by popularity, and no two equal.

        `ranking_metrics` counts a tie in the target's favour, which would flatter a counter that
        gives most items 0; a shop must show *some* order, so the baseline is measured on that order.
        """
        primary = self.primary(inputs)
        order = np.argsort(-primary, axis=1, kind="stable")  # equal scores keep column order = popularity
        ranks = np.broadcast_to(np.arange(primary.shape[1], 0, -1, dtype=np.float64), primary.shape)
        scores = np.empty_like(primary)
        np.put_along_axis(scores, order, ranks, axis=1)
        return scores


class Popularity(Baseline):
    name = "popularity"

    def __init__(self, dataset: Dataset) -> None:
        counts = dataset.train_item_counts.astype(np.float64)
        counts[:FIRST_ITEM] = BLOCKED
        self.counts = counts

    def primary(self, inputs: np.ndarray) -> np.ndarray:
        return np.repeat(self.counts[None, :], len(inputs), axis=0)


def training_sequences(dataset: Dataset) -> np.ndarray:
    """[N, L + 1] training windows as item sequences (inputs plus the last target), left-padded.

    Consecutive windows of one shopper share exactly one step, so every pair of steps inside a window
    is counted once; pairs more than one step apart that straddle two windows are not counted.
    """
    return np.concatenate([dataset.train_inputs, dataset.train_targets[:, -1:]], axis=1)


def follow_counts(dataset: Dataset, span: int, decay: float) -> sp.csr_matrix:
    """[V, V] sparse: entry (a, b) sums decay**(g-1) over training pairs where b came g ≤ span steps after a."""
    sequences = training_sequences(dataset)
    size = dataset.vocabulary.size
    rows, cols, weights = [], [], []
    for gap in range(1, span + 1):
        before, after = sequences[:, :-gap].ravel(), sequences[:, gap:].ravel()
        real = (before >= FIRST_ITEM) & (after >= FIRST_ITEM)
        rows.append(before[real])
        cols.append(after[real])
        weights.append(np.full(int(real.sum()), decay ** (gap - 1)))
    # COO → CSR sums duplicate (a, b) pairs: that is the counting.
    return sp.coo_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))), shape=(size, size)).tocsr()


def history_votes(inputs: np.ndarray, size: int, window: int, decay: float) -> sp.csr_matrix:
    """[B, V] sparse: each of the last `window` real steps adds decay**(distance from the end) to its item."""
    length = inputs.shape[1]
    steps = min(window, length)
    recent = inputs[:, length - steps :][:, ::-1]  # column d = d steps before the last
    weight = np.broadcast_to(decay ** np.arange(steps, dtype=np.float64), recent.shape)
    real = recent >= FIRST_ITEM
    rows = np.broadcast_to(np.arange(len(inputs))[:, None], recent.shape)
    return sp.coo_matrix((weight[real], (rows[real], recent[real])), shape=(len(inputs), size)).tocsr()


class Cooccurrence(Baseline):
    """Session-kNN over the recent history: decayed votes of the last `window` steps through `follow_counts`."""

    name = "cooccurrence"

    def __init__(self, dataset: Dataset, window: int, decay: float, follow_span: int) -> None:
        self.window, self.decay = window, decay
        self.size = dataset.vocabulary.size
        self.follows = follow_counts(dataset, follow_span, decay)

    def primary(self, inputs: np.ndarray) -> np.ndarray:
        scores = (history_votes(inputs, self.size, self.window, self.decay) @ self.follows).toarray()
        scores[:, :FIRST_ITEM] = BLOCKED
        return scores


class Transitions(Cooccurrence):
    """First-order item-to-item: how often each item directly followed the last one in training."""

    name = "transitions"

    def __init__(self, dataset: Dataset) -> None:
        super().__init__(dataset, window=1, decay=1.0, follow_span=1)


def fit_baselines(dataset: Dataset, config: BaselineConfig = BaselineConfig()) -> list[Baseline]:
    return [
        Popularity(dataset),
        Transitions(dataset),
        Cooccurrence(dataset, window=config.window, decay=config.decay, follow_span=config.follow_span),
    ]


@dataclass(frozen=True)
class BaselineReport:
    """Every baseline's validation metrics (overall and per slice) and the strongest by `metric`."""

    metrics: dict[str, dict[str, float]]
    slices: dict[str, dict[str, dict[str, float]]]
    strongest: str
    metric: str
    config: dict[str, object]

    def as_record(self) -> dict[str, object]:
        """The `baselines` section of a run record and of a model card."""
        return {"strongest": self.strongest, "metric": self.metric, "config": self.config, "metrics": self.metrics}


def strongest(metrics: dict[str, dict[str, float]], metric: str) -> str:
    """Name of the baseline with the highest `metric` (the first listed wins a tie)."""
    return max(metrics, key=lambda name: metrics[name][metric])


def evaluate_baselines(dataset: Dataset, config: BaselineConfig = BaselineConfig()) -> BaselineReport:
    """Score every baseline on the validation rows with the models' metrics and slices."""
    metrics, slices = {}, {}
    for baseline in fit_baselines(dataset, config):
        sliced = SlicedMetrics(dataset)
        for start, stop in batches(len(dataset.valid_targets)):
            sliced.add(start, baseline.scores(dataset.valid_inputs[start:stop]))
        metrics[baseline.name], slices[baseline.name] = sliced.overall(), sliced.slices()
    return BaselineReport(metrics, slices, strongest(metrics, config.metric), config.metric, asdict(config))


def evaluate_popularity(dataset: Dataset) -> dict[str, float]:
    """Popularity's overall metrics (ties broken by item order, as every baseline's)."""
    sliced = SlicedMetrics(dataset)
    popularity = Popularity(dataset)
    for start, stop in batches(len(dataset.valid_targets)):
        sliced.add(start, popularity.scores(dataset.valid_inputs[start:stop]))
    return sliced.overall()
