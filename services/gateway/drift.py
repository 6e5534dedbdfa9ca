"""Live input and output distributions per variant, compared with the model version's reference by PSI
every `interval_s`, exported as `vitrine_drift_psi{feature, variant}`.

Which reference (`gateway.drift_reference`, docs/drift.md):
- `capture` (default): the version's own first `baseline_observations` model-ranked requests in serving.
  The gateway only asks a model for some shoppers (not cold starts, not short histories that the transitions
  answer serves), with histories as the feature store keeps them and exclusions of the request: no offline
  data set reproduces that population, so a reference taken offline reads as drift forever (PSI 1–4 on steady
  traffic). Captured observations are never compared with themselves: PSI covers only later ones, and no
  PSI exists for a version until its baseline is complete.
- `metadata`: the distributions the export recorded on validation data (`metadata.json` → "reference").

Observing writes a few numbers into a fixed ring buffer per variant, or into the version's baseline arrays
while it captures (no per-request objects, so the collector has nothing to chase); references are built and
PSI is computed in the background with whole-array operations, so that it never holds the event loop for long.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import numpy as np

from vitrine.export.drift import (
    POPULARITY_BUCKETS, SOURCE_SERVING, build_reference, history_stats, popularity_counts, popularity_upper_index, psi,
)
from vitrine.services.gateway.baselines import BaselineStore
from vitrine.services.gateway.metrics import GatewayMetrics, label_sets
from vitrine.services.gateway.ranking import ServedModel
from vitrine.settings import DriftReference

log = logging.getLogger(__name__)
CAPTURE: DriftReference = "capture"
METADATA: DriftReference = "metadata"


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
        self.compared = np.zeros(size, dtype=bool)
        """False for an observation that went into its version's baseline: it is never compared with itself."""

    def write(self, model: int, length: int, unknown: int, real: int, popularity: np.ndarray, top1: float | None,
              compared: bool = True) -> None:
        slot = self.count % self.size
        self.model[slot], self.length[slot], self.unknown[slot], self.real[slot] = model, length, unknown, real
        self.popularity[slot] = popularity
        self.top1[slot] = np.nan if top1 is None else top1
        self.compared[slot] = compared
        self.count += 1

    @property
    def latest_model(self) -> int:
        return int(self.model[(self.count - 1) % self.size])


class _Baseline(_Ring):
    """The first `size` observations of one version (capture mode), across variants: the ring's columns, never
    written past full (its `model` column holds the version's index); a reference once full."""

    @property
    def full(self) -> bool:
        return self.count >= self.size

    def reference(self, max_len: int, upper_index: list[int]) -> dict:
        scores = self.top1[~np.isnan(self.top1)]
        return build_reference(self.length, int(self.unknown.sum()), int(self.real.sum()), self.popularity.sum(axis=0),
                               scores, max_len, upper_index, SOURCE_SERVING)


@dataclass
class _Version:
    """A served model version the monitor has seen: its popularity buckets, and its reference (or the baseline
    being captured for it)."""

    model: ServedModel  # kept alive, so that its id is never reused
    upper_index: list[int]
    reference: dict | None
    baseline: _Baseline | None = field(default=None, repr=False)
    looked_up: bool = False
    """Capture mode: the baseline store was asked for this version's baseline."""
    stored: bool = False
    """Capture mode: `reference` is the one in the baseline store."""


class DriftMonitor:
    def __init__(self, metrics: GatewayMetrics, window: int, interval_s: float, min_observations: int,
                 reference: DriftReference = METADATA, baseline_observations: int = 0, store: BaselineStore | None = None) -> None:
        if reference == CAPTURE and baseline_observations < 1:
            raise ValueError("capture mode needs baseline_observations ≥ 1")
        self.metrics = metrics
        self.window = window
        self.interval_s = interval_s
        self.min_observations = min_observations
        self.mode = reference
        self.baseline_observations = baseline_observations
        self.store = store
        self._rings: dict[str, _Ring] = {}
        self._versions: list[_Version] = []
        self._model_index: dict[int, int] = {}  # id(ServedModel) → position in _versions
        self._task: asyncio.Task | None = None

    def _version(self, model: ServedModel) -> int | None:
        """The version's position in _versions (registered on first sight); None when it cannot be monitored
        (metadata mode, and the version's metadata carries no reference)."""
        index = self._model_index.get(id(model))
        if index is not None:
            return index
        if self.mode == METADATA:
            if model.reference is None:
                return None
            version = _Version(model, list(model.reference["popularity_mix"]["bucket_upper_index"]), model.reference)
        else:
            upper = popularity_upper_index(model.first_item_id + len(model.item_ids))
            version = _Version(model, upper, None, _Baseline(self.baseline_observations))
        index = self._model_index[id(model)] = len(self._versions)
        self._versions.append(version)
        return index

    def observe(self, variant: str, model: ServedModel, items: np.ndarray, top1: float | None) -> None:
        index = self._version(model)
        if index is None:
            return
        version = self._versions[index]
        ring = self._rings.get(variant)
        if ring is None:
            ring = self._rings[variant] = _Ring(self.window)
        length, unknown, real = history_stats(items)
        popularity = popularity_counts(items, version.upper_index)
        baseline = version.baseline
        capturing = baseline is not None and not baseline.full
        if capturing:
            baseline.write(index, int(length), unknown, real, popularity, top1)
        ring.write(index, int(length), unknown, real, popularity, top1, compared=not capturing)

    def references(self) -> dict[tuple[str, str], dict | None]:
        """(model, version) → the reference PSI is computed against (None: its baseline is still being captured)."""
        return {(v.model.name, v.model.version): v.reference for v in self._versions}

    def _complete_baselines(self) -> None:
        for version in self._versions:
            self._complete(version)

    def _complete(self, version: _Version) -> None:
        """A full baseline becomes the version's reference."""
        if version.reference is None and version.baseline is not None and version.baseline.full:
            version.reference = version.baseline.reference(version.model.max_len, version.upper_index)
            version.baseline = None
            log.info("drift baseline of %s v%s captured from its first %d requests in serving",
                     version.model.name, version.model.version, self.baseline_observations)

    async def sync_baselines(self) -> None:
        """Capture mode with a store: adopt a version's stored baseline (another gateway's, or ours before a restart),
        store the one completed here (unless another gateway was first: then adopt theirs), refresh the others."""
        if self.store is None or self.mode != CAPTURE:
            return
        for version in list(self._versions):  # forget() may renumber meanwhile; the objects stay valid
            model = version.model
            key = (model.name, model.version, model.fingerprint)
            if version.reference is None and not version.looked_up:
                found = await self.store.load(*key)
                version.looked_up = True
                if found is not None:
                    version.reference, version.baseline, version.stored = found, None, True
                    log.info("drift baseline of %s v%s adopted from the baseline store", model.name, model.version)
                    continue
            self._complete(version)
            if version.reference is not None and not version.stored:
                version.reference = await self.store.save(*key, version.reference)
                version.stored = True
            elif version.stored:
                await self.store.touch(*key)

    def forget(self, keep_variants: set[str]) -> None:
        """Drop the rings and PSI series of variants that left the experiment, and the model versions
        no ring refers to any more (indices in the rings are renumbered)."""
        for variant in set(self._rings) - keep_variants:
            del self._rings[variant]
        for feature, variant in label_sets(self.metrics.drift_psi, ("feature", "variant")):
            if variant not in keep_variants:
                self.metrics.drift_psi.remove(feature, variant)
        referenced = sorted({int(i) for ring in self._rings.values() for i in np.unique(ring.model) if i >= 0})
        if len(referenced) == len(self._versions):
            return
        renumber = np.full(max(len(self._versions), 1), -1, dtype=np.int64)
        renumber[referenced] = np.arange(len(referenced))
        for ring in self._rings.values():
            known = ring.model >= 0
            ring.model[known] = renumber[ring.model[known]]
        self._versions = [self._versions[i] for i in referenced]
        self._model_index = {id(v.model): i for i, v in enumerate(self._versions)}

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
                await self.sync_baselines()
            except Exception as exc:  # noqa: BLE001 - Redis away: baselines stay local until it answers
                log.warning("drift baseline store unavailable: %s", exc)
            try:
                self.compute()
            except Exception as exc:  # noqa: BLE001 - monitoring must never hurt serving
                log.warning("drift computation failed: %s", exc)

    def compute(self) -> dict[tuple[str, str], float]:
        self._complete_baselines()
        result: dict[tuple[str, str], float] = {}
        for variant, ring in self._rings.items():
            if ring.count < self.min_observations:
                continue
            latest = ring.latest_model  # the version serving now; observations of older versions are skipped
            reference = self._versions[latest].reference
            if reference is None:
                continue  # its baseline is still being captured
            same = (ring.model == latest) & ring.compared
            if int(same.sum()) < self.min_observations:
                continue
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
