"""Model side of the request path: which model version serves, how a user's features become its
inputs, and the micro-batched, circuit-broken Triton calls.

The encoding is the one training used (`export/data/sequences.py`): a user's recent events collapse
into steps, the newest `max_len` steps are left-padded, unknown items map to the unknown id; the
vocabulary comes from the version's `metadata.json` in the model repository.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as triton
from purgatory import AsyncCircuitBreakerFactory

from vitrine.contracts import ranker
from vitrine.export.data.sequences import OOV, PAD, collapse_runs, encode_history
from vitrine.services.features.store import RecentEvent
from vitrine.services.gateway.batcher import MicroBatcher
from vitrine.services.gateway.metrics import GatewayMetrics
from vitrine.settings import GatewaySettings

Row = tuple[np.ndarray, np.ndarray, np.ndarray]
Ranked = list[tuple[str, float]]


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    max_len: int
    max_k: int
    item_ids: tuple[str, ...]
    first_item_id: int
    index: dict[str, int] = field(repr=False, compare=False)
    reference: dict | None = field(default=None, repr=False, compare=False)
    """Reference distributions for drift monitoring, from metadata.json."""

    @classmethod
    def load(cls, repository: Path, name: str, version: str) -> ServedModel:
        metadata = json.loads((repository / name / version / ranker.METADATA_FILE).read_text())
        serving, items = metadata["serving"], tuple(metadata["vocabulary"])
        first = int(serving["first_item_id"])
        return cls(name, version, int(serving["max_len"]), int(serving["max_k"]), items, first,
                   {item: i + first for i, item in enumerate(items)}, metadata.get("reference"))

    def history(self, recent: Sequence[RecentEvent]) -> tuple[np.ndarray, np.ndarray]:
        steps, kinds = collapse_runs([e.item_id for e in recent], [e.type.index for e in recent])
        return encode_history([self.index.get(i, OOV) for i in steps], kinds, self.max_len)

    def exclusions(self, item_ids: Iterable[str], width: int) -> np.ndarray:
        known = [i for i in dict.fromkeys(self.index[item] for item in item_ids if item in self.index)][:width]
        return np.array(known + [PAD] * (width - len(known)), dtype=np.int64)

    def decode(self, ids: np.ndarray, scores: np.ndarray) -> Ranked:
        first, items = self.first_item_id, self.item_ids
        # Plain Python ints/floats first: per-element numpy scalars cost ~3 µs each on the hot path.
        return [(items[i - first], s) for i, s in zip(ids.tolist(), scores.tolist(), strict=True)
                if s > ranker.EXCLUDED_SCORE and i >= first]


class ModelCatalog:
    """Resolves a variant's (model, version) to a ready `ServedModel`; an empty version means the
    newest version Triton has ready, re-checked every `refresh_s`."""

    def __init__(self, client: triton.InferenceServerClient, repository: Path, refresh_s: float) -> None:
        self.client = client
        self.repository = repository
        self.refresh_s = refresh_s
        self._models: dict[tuple[str, str], ServedModel] = {}
        self._newest: dict[str, tuple[str, float]] = {}

    async def ready_versions(self, name: str) -> list[str]:
        metadata = await self.client.get_model_metadata(name, as_json=True)
        versions = sorted(metadata.get("versions", []), key=int)
        return [v for v in versions if await self.client.is_model_ready(name, v)]

    async def resolve(self, name: str, version: str) -> ServedModel:
        if not version:
            cached = self._newest.get(name)
            if cached is None or time.monotonic() - cached[1] > self.refresh_s:
                try:
                    ready = await self.ready_versions(name)
                except Exception:
                    if cached is None:
                        raise
                    ready = []  # Triton unreachable: keep the last answer; the call itself will fail fast
                if ready:
                    cached = (ready[-1], time.monotonic())
                    self._newest[name] = cached
                elif cached is None:
                    raise LookupError(f"no ready version of model {name!r}")
            version = cached[0]
        key = (name, version)
        if key not in self._models:
            self._models[key] = ServedModel.load(self.repository, name, version)
        return self._models[key]

    async def is_ready(self, name: str, version: str) -> bool:
        try:
            return bool(await self.ready_versions(name)) if not version else await self.client.is_model_ready(name, version)
        except Exception:  # noqa: BLE001 - unknown model or Triton away: not ready
            return False


class RankerPool:
    """One micro-batcher per served (model, version), all calling Triton through one circuit breaker per model."""

    def __init__(self, settings: GatewaySettings, client: triton.InferenceServerClient, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.client = client
        self.metrics = metrics
        self.breakers = AsyncCircuitBreakerFactory(default_threshold=settings.breaker_threshold, default_ttl=settings.breaker_reset_s)
        self._batchers: dict[tuple[str, str], MicroBatcher[Row, tuple[np.ndarray, np.ndarray]]] = {}

    def batcher(self, model: ServedModel) -> MicroBatcher[Row, tuple[np.ndarray, np.ndarray]]:
        key = (model.name, model.version)
        if key not in self._batchers:
            def observe(size: int, waits: list[float], name: str = model.name) -> None:
                self.metrics.batch_size.labels(name).observe(size)
                for wait in waits:
                    self.metrics.stage.labels("queue").observe(wait)

            batcher = MicroBatcher(
                lambda rows, timeout, m=model: self._infer(m, rows, timeout),
                max_batch=self.settings.max_batch, max_delay_s=self.settings.max_delay_ms / 1000,
                queue_size=self.settings.queue_size, max_inflight=self.settings.max_inflight_batches, on_batch=observe,
            )
            batcher.start()
            self._batchers[key] = batcher
        return self._batchers[key]

    async def _infer(self, model: ServedModel, rows: Sequence[Row], timeout_s: float | None) -> list[tuple[np.ndarray, np.ndarray]]:
        arrays = [np.stack([row[i] for row in rows]) for i in range(3)]
        inputs = []
        for name, array in zip(ranker.INPUTS, arrays, strict=True):
            tensor = triton.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        cap = self.settings.triton_timeout_ms / 1000
        timeout = min(cap, timeout_s) if timeout_s is not None else cap
        breaker = await self.breakers.get_breaker(f"triton:{model.name}")
        started = time.perf_counter()
        async with breaker:
            result = await self.client.infer(
                model.name, inputs, model_version=model.version,
                outputs=[triton.InferRequestedOutput(name) for name in ranker.OUTPUTS], client_timeout=timeout,
            )
        self.metrics.stage.labels("triton").observe(time.perf_counter() - started)
        ids, scores = result.as_numpy(ranker.TOP_IDS), result.as_numpy(ranker.TOP_SCORES)
        return [(ids[i], scores[i]) for i in range(len(rows))]

    async def stop(self) -> None:
        for batcher in self._batchers.values():
            await batcher.stop()
