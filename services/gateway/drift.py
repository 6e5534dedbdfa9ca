"""Live input and output distributions per variant, compared with the model version's reference
(`metadata.json`) by PSI every `interval_s`, exported as `vitrine_drift_psi{feature, variant}`.

Observing writes a few numbers into a fixed ring buffer per variant (no per-request objects, so the
collector has nothing to chase); PSI is computed in the background over the last `window`
observations with whole-array operations, so that it never holds the event loop for long.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from vitrine.export.drift import POPULARITY_BUCKETS, history_stats, popularity_counts, psi
from vitrine.services.gateway.metrics import GatewayMetrics, label_sets
from vitrine.services.gateway.ranking import ServedModel

log = logging.getLogger(__name__)


class _Ring:
    """The last `size` observations of one variant, column by column."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.count = 0  # observations ever written; slot = count % size
        self.model = np.full(size, -1, dtype=np.int64)  # index into DriftMonitor._models
        self.length = np.zeros(size, dtype=np.int64)
        self.unknown = np.zeros(size, dtype=np.int64)
        self.real = np.zeros(size, dtype=np.int64)
        self.popularity = np.zeros((size, len(POPULARITY_BUCKETS)), dtype=np.int64)
        self.top1 = np.full(size, np.nan)

    def write(self, model: int, length: int, unknown: int, real: int, popularity: np.ndarray, top1: float | None) -> None:
        slot = self.count % self.size
        self.model[slot], self.length[slot], self.unknown[slot], self.real[slot] = model, length, unknown, real
        self.popularity[slot] = popularity
        self.top1[slot] = np.nan if top1 is None else top1
        self.count += 1

    @property
    def latest_model(self) -> int:
        return int(self.model[(self.count - 1) % self.size])


class DriftMonitor:
    def __init__(self, metrics: GatewayMetrics, window: int, interval_s: float, min_observations: int) -> None:
        self.metrics = metrics
        self.window = window
        self.interval_s = interval_s
        self.min_observations = min_observations
        self._rings: dict[str, _Ring] = {}
        self._models: list[ServedModel] = []
        self._model_index: dict[int, int] = {}  # id(ServedModel) → position in _models
        self._task: asyncio.Task | None = None

    def observe(self, variant: str, model: ServedModel, items: np.ndarray, top1: float | None) -> None:
        if model.reference is None:
            return
        index = self._model_index.get(id(model))
        if index is None:
            index = self._model_index[id(model)] = len(self._models)
            self._models.append(model)  # kept alive, so that its id is never reused
        ring = self._rings.get(variant)
        if ring is None:
            ring = self._rings[variant] = _Ring(self.window)
        length, unknown, real = history_stats(items)
        ring.write(index, int(length), unknown, real,
                   popularity_counts(items, model.reference["popularity_mix"]["bucket_upper_index"]), top1)

    def forget(self, keep_variants: set[str]) -> None:
        """Drop the rings and PSI series of variants that left the experiment, and the model versions
        no ring refers to any more (indices in the rings are renumbered)."""
        for variant in set(self._rings) - keep_variants:
            del self._rings[variant]
        for feature, variant in label_sets(self.metrics.drift_psi, ("feature", "variant")):
            if variant not in keep_variants:
                self.metrics.drift_psi.remove(feature, variant)
        referenced = sorted({int(i) for ring in self._rings.values() for i in np.unique(ring.model) if i >= 0})
        if len(referenced) == len(self._models):
            return
        renumber = np.full(max(len(self._models), 1), -1, dtype=np.int64)
        renumber[referenced] = np.arange(len(referenced))
        for ring in self._rings.values():
            known = ring.model >= 0
            ring.model[known] = renumber[ring.model[known]]
        self._models = [self._models[i] for i in referenced]
        self._model_index = {id(model): i for i, model in enumerate(self._models)}

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.compute()
            except Exception as exc:  # noqa: BLE001 - monitoring must never hurt serving
                log.warning("drift computation failed: %s", exc)

    def compute(self) -> dict[tuple[str, str], float]:
        result: dict[tuple[str, str], float] = {}
        for variant, ring in self._rings.items():
            if ring.count < self.min_observations:
                continue
            latest = ring.latest_model  # the version serving now; observations of older versions are skipped
            same = ring.model == latest
            if int(same.sum()) < self.min_observations:
                continue
            reference = self._models[latest].reference
            assert reference is not None
            lengths = ring.length[same]
            seq_ref = reference["sequence_length"]
            unknown, real = int(ring.unknown[same].sum()), int(ring.real[same].sum())
            empty = float(np.mean(lengths == 0))
            result[("sequence_length", variant)] = psi(seq_ref["counts"], np.histogram(lengths, bins=seq_ref["edges"])[0])
            result[("popularity_mix", variant)] = psi(reference["popularity_mix"]["shares"], ring.popularity[same].sum(axis=0))
            ref_unknown = reference["unknown_item_rate"]
            result[("unknown_item_rate", variant)] = psi([ref_unknown, 1 - ref_unknown], [unknown, max(real - unknown, 0)])
            ref_empty = reference["empty_history_rate"]
            result[("empty_history_rate", variant)] = psi([ref_empty, 1 - ref_empty], [empty, 1 - empty])
            scores = ring.top1[same]
            scores = scores[~np.isnan(scores)]
            if len(scores) >= self.min_observations:
                top_ref = reference["top1_score"]
                result[("top1_score", variant)] = psi(top_ref["counts"], np.histogram(scores, bins=top_ref["edges"])[0])
        for (feature, variant), value in result.items():
            self.metrics.drift_psi.labels(feature, variant).set(value)
        return result
