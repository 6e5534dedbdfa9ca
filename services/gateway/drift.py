"""Live input and output distributions per variant, compared with the model version's reference
(`metadata.json`) by PSI every `interval_s`, exported as `vitrine_drift_psi{feature, variant}`.

Observing is a few array operations per request on the hot path; PSI itself is computed in the
background over the last `window` observations of each variant.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from vitrine.export.drift import history_stats, popularity_counts, psi
from vitrine.services.gateway.metrics import GatewayMetrics
from vitrine.services.gateway.ranking import ServedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Observation:
    model: ServedModel
    length: int
    unknown: int
    real: int
    popularity: np.ndarray
    top1: float | None


class DriftMonitor:
    def __init__(self, metrics: GatewayMetrics, window: int, interval_s: float, min_observations: int) -> None:
        self.metrics = metrics
        self.window = window
        self.interval_s = interval_s
        self.min_observations = min_observations
        self._recent: dict[str, deque[_Observation]] = {}
        self._task: asyncio.Task | None = None

    def observe(self, variant: str, model: ServedModel, items: np.ndarray, top1: float | None) -> None:
        if model.reference is None:
            return
        lengths, unknown, real = history_stats(items)
        popularity = popularity_counts(items, model.reference["popularity_mix"]["bucket_upper_index"])
        queue = self._recent.setdefault(variant, deque(maxlen=self.window))
        queue.append(_Observation(model, int(lengths), unknown, real, popularity, top1))

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
        for variant, observations in self._recent.items():
            if len(observations) < self.min_observations:
                continue
            model = observations[-1].model  # the version serving now; older observations of others are skipped
            reference = model.reference
            assert reference is not None
            same = [o for o in observations if o.model is model]
            if len(same) < self.min_observations:
                continue
            lengths = np.array([o.length for o in same])
            seq_ref = reference["sequence_length"]
            unknown, real = sum(o.unknown for o in same), sum(o.real for o in same)
            empty = float(np.mean(lengths == 0))
            result[("sequence_length", variant)] = psi(seq_ref["counts"], np.histogram(lengths, bins=seq_ref["edges"])[0])
            result[("popularity_mix", variant)] = psi(reference["popularity_mix"]["shares"], np.sum([o.popularity for o in same], axis=0))
            ref_unknown = reference["unknown_item_rate"]
            result[("unknown_item_rate", variant)] = psi([ref_unknown, 1 - ref_unknown], [unknown, max(real - unknown, 0)])
            ref_empty = reference["empty_history_rate"]
            result[("empty_history_rate", variant)] = psi([ref_empty, 1 - ref_empty], [empty, 1 - empty])
            scores = [o.top1 for o in same if o.top1 is not None]
            if len(scores) >= self.min_observations:
                top_ref = reference["top1_score"]
                result[("top1_score", variant)] = psi(top_ref["counts"], np.histogram(scores, bins=top_ref["edges"])[0])
        for (feature, variant), value in result.items():
            self.metrics.drift_psi.labels(feature, variant).set(value)
        return result
