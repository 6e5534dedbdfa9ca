"""Model side of the request path: which model version serves, how a user's features become its
inputs, and the micro-batched, circuit-broken Triton calls.

The encoding is the one training used (`export/data/sequences.py`): a user's recent events collapse
into steps, the newest `max_len` steps are left-padded, unknown items map to the unknown id; the
vocabulary (and the drift reference) comes from the version's `metadata.json`, found through Triton's
config API: an exported version's config carries `parameters { key: "vitrine.metadata.<version>" }`, a
`runs:/` URI in the model registry, which the gateway downloads over HTTP from `registry.url`. So
gateway and Triton share no filesystem, as in production. Fallback, for versions exported without a
registry (the committed v1 models, `vitrine export --no-registry`): the file beside the version's
model.onnx in the local model repository — it works only where the gateway can read that folder.

Nothing here waits without a bound on the request path: Triton's readiness is asked with a timeout,
once per model however many requests find the cache stale (they keep serving the cached version
meanwhile); a version's vocabulary is parsed in a worker thread, once; callers bound their wait with
the request's budget.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException

from vitrine.contracts import ranker
from vitrine.export.data.sequences import OOV, PAD, collapse_runs, encode_history
from vitrine.export.registry import artifact_http_url, metadata_parameter
from vitrine.services.features.store import RecentEvent
from vitrine.services.gateway.batcher import MicroBatcher
from vitrine.services.gateway.breaker import CircuitBreaker
from vitrine.services.gateway.metrics import GatewayMetrics
from vitrine.settings import GatewaySettings

log = logging.getLogger(__name__)
POPULARITY_MODEL = "popularity"
"""A variant may name this model: popularity from Redis, served without Triton (a baseline arm, not degraded)."""
FINGERPRINT_DIGITS = 16
Row = tuple[np.ndarray, np.ndarray, np.ndarray, bool]
"""(item_ids, event_types, exclude_ids, explain): one request's model inputs and whether it wants explanations."""
Ranked = list[tuple[str, float]]
Scored = tuple[np.ndarray, np.ndarray, np.ndarray | None]
"""(top_ids, top_scores, explain_steps or None when not asked for or the version has none) of one request."""


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
    """Reference distributions on validation data, from metadata.json: the drift baseline in the gateway's `metadata`
    mode (the default, `capture`, takes the version's first requests in serving instead; services/gateway/drift.py)."""
    explains: bool = False
    """Triton's config of the model declares `explain_steps` (every version it serves has the output)."""
    fingerprint: str = field(default="", compare=False)
    """sha256 (hex, 16 digits) of the version's metadata.json: tells this version from another one exported later under
    the same name and number (a captured drift baseline is stored under it)."""

    @classmethod
    def load(cls, repository: Path, name: str, version: str) -> ServedModel:
        """From the version's metadata.json in a local model repository (tools and the no-registry fallback)."""
        return cls.from_metadata(name, version, (repository / name / version / ranker.METADATA_FILE).read_bytes())

    @classmethod
    def from_metadata(cls, name: str, version: str, raw: bytes) -> ServedModel:
        metadata = json.loads(raw)
        serving, items = metadata["serving"], tuple(metadata["vocabulary"])
        first = int(serving["first_item_id"])
        return cls(name, version, int(serving["max_len"]), int(serving["max_k"]), items, first,
                   {item: i + first for i, item in enumerate(items)}, metadata.get("reference"),
                   fingerprint=hashlib.sha256(raw).hexdigest()[:FINGERPRINT_DIGITS])

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

    def explanations(self, history: np.ndarray, ids: np.ndarray, steps: np.ndarray) -> dict[str, str]:
        """Recommended item → the history item at its explanation step (`history`: the item_ids row sent to the
        model). Slots without a step (-1), or whose step is out of range or not a known item, have none."""
        first, items, length = self.first_item_id, self.item_ids, len(history)
        history_ids = history.tolist()
        out: dict[str, str] = {}
        for i, step in zip(ids.tolist(), steps.tolist(), strict=True):
            if i >= first and 0 <= step < length and history_ids[step] >= first:
                out[items[i - first]] = items[history_ids[step] - first]
        return out


ModelKey = tuple[str, str]


def _remove_series(metric, *labels: str) -> None:  # noqa: ANN001 - any labelled prometheus metric
    try:
        metric.remove(*labels)
    except KeyError:
        pass  # never observed
T = TypeVar("T")


def _shared(tasks: dict[Hashable, asyncio.Task], key: Hashable, work: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
    """One task per key however many callers ask; shielded, so a caller that gives up (its budget
    ran out) does not cancel the work for the others."""
    task = tasks.get(key)
    if task is None:
        task = asyncio.ensure_future(work())
        tasks[key] = task
        task.add_done_callback(lambda t: (tasks.pop(key, None), t.cancelled() or t.exception()))
    return asyncio.shield(task)


class ModelCatalog:
    """Resolves a variant's (model, version) to a ready `ServedModel`; an empty version means the
    newest version Triton has ready, re-checked every `refresh_s` in the background while requests
    go on with the version last seen (so a Triton that stops answering changes nothing for them)."""

    def __init__(self, client: triton.InferenceServerClient, repository: Path, refresh_s: float, call_timeout_s: float,
                 registry_url: str = "", registry_timeout_s: float = 10.0) -> None:
        self.client = client
        self.repository = repository
        self.registry_url = registry_url
        self.registry_timeout_s = registry_timeout_s
        self.refresh_s = refresh_s
        self.call_timeout_s = call_timeout_s
        self._models: dict[ModelKey, ServedModel] = {}
        self._newest: dict[str, tuple[str, float]] = {}
        self._refreshing: dict[Hashable, asyncio.Task] = {}
        self._loading: dict[Hashable, asyncio.Task] = {}

    async def ready_versions(self, name: str) -> list[str]:
        timeout = self.call_timeout_s
        metadata = await self.client.get_model_metadata(name, as_json=True, client_timeout=timeout)
        versions = sorted(metadata.get("versions", []), key=int)
        ready = await asyncio.gather(*(self.client.is_model_ready(name, v, client_timeout=timeout) for v in versions))
        return [v for v, ok in zip(versions, ready, strict=True) if ok]

    async def _refresh_newest(self, name: str) -> str:
        ready = await self.ready_versions(name)
        if not ready:
            raise LookupError(f"no ready version of model {name!r}")
        self._newest[name] = (ready[-1], time.monotonic())
        return ready[-1]

    async def newest(self, name: str) -> str:
        cached = self._newest.get(name)
        if cached is None:
            return await _shared(self._refreshing, name, lambda: self._refresh_newest(name))
        if time.monotonic() - cached[1] > self.refresh_s:
            _shared(self._refreshing, name, lambda: self._refresh_newest(name))  # in the background
        return cached[0]

    async def resolve(self, name: str, version: str) -> ServedModel:
        """The served model; the caller bounds the wait (asyncio.timeout) with the request's budget."""
        if not version:
            version = await self.newest(name)
        key = (name, version)
        model = self._models.get(key)
        if model is None:
            model = await _shared(self._loading, key, lambda: self._load(name, version))
        return model

    async def _config(self, name: str, version: str) -> tuple[str | None, bool]:
        """From Triton's config of the model: the version's metadata URI (None: exported without a registry)
        and whether the config declares the `explain_steps` output."""
        reply = await self.client.get_model_config(name, version, as_json=True, client_timeout=self.call_timeout_s)
        config = reply.get("config", {})
        entry = config.get("parameters", {}).get(metadata_parameter(version))
        return (entry.get("string_value") or None if entry else None), ranker.declares_explain_steps(config)

    async def _fetch(self, uri: str) -> bytes:
        if not self.registry_url:
            raise LookupError(f"model metadata is in the registry ({uri}) but no registry URL is configured")
        async with httpx.AsyncClient(timeout=self.registry_timeout_s) as client:
            response = await client.get(artifact_http_url(self.registry_url, uri))
        if response.status_code != 200:
            raise LookupError(f"registry answered {response.status_code} for {uri}: {response.text[:200]}")
        return response.content

    async def _load(self, name: str, version: str) -> ServedModel:
        uri, explains = await self._config(name, version)
        if uri is None:
            # No registry entry (committed or --no-registry versions): the local repository's file, documented
            # as the local-stack fallback. A version whose config names a URI never falls back: its metadata
            # must come from where the export put it, or the version is not served.
            log.info("model %s v%s has no registry metadata in its Triton config; reading %s from %s",
                     name, version, ranker.METADATA_FILE, self.repository)
            model = await asyncio.to_thread(ServedModel.load, self.repository, name, version)
        else:
            raw = await self._fetch(uri)
            # Parsing a vocabulary of 100k items takes tens of ms: never on the event loop.
            model = await asyncio.to_thread(ServedModel.from_metadata, name, version, raw)
        if explains:
            model = replace(model, explains=True)
        self._models[(name, version)] = model
        return model

    async def is_ready(self, name: str, version: str) -> bool:
        if name == POPULARITY_MODEL:
            return True  # no model behind it
        try:
            if not version:
                return bool(await self.ready_versions(name))
            return await self.client.is_model_ready(name, version, client_timeout=self.call_timeout_s)
        except Exception:  # noqa: BLE001 - unknown model or Triton away: not ready
            return False

    def in_use(self, variants: Iterable[tuple[str, str]]) -> set[ModelKey]:
        """The (model, version) pairs the given variants serve now ("" = the newest known)."""
        keys = set()
        for name, version in variants:
            if name == POPULARITY_MODEL:
                continue
            resolved = version or (self._newest[name][0] if name in self._newest else "")
            if resolved:
                keys.add((name, resolved))
        return keys

    def loaded(self) -> set[ModelKey]:
        return set(self._models)

    def evict(self, keys: Iterable[ModelKey]) -> None:
        for key in keys:
            self._models.pop(key, None)


class RankerPool:
    """One micro-batcher per served (model, version), all calling Triton through one circuit breaker per model."""

    def __init__(self, settings: GatewaySettings, client: triton.InferenceServerClient, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.client = client
        self.metrics = metrics
        self._breakers: dict[str, CircuitBreaker] = {}
        self._batchers: dict[ModelKey, MicroBatcher[Row, Scored]] = {}

    def breaker(self, name: str) -> CircuitBreaker:
        if name not in self._breakers:
            gauge = self.metrics.breaker_state.labels(name)
            self._breakers[name] = CircuitBreaker(
                self.settings.breaker_threshold, self.settings.breaker_reset_s, self.settings.breaker_probes,
                on_state=lambda state: gauge.set(int(state)))
        return self._breakers[name]

    def batcher(self, model: ServedModel) -> MicroBatcher[Row, Scored]:
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

    def _blames_triton(self, exc: InferenceServerException, timeout_s: float) -> bool:
        """Is this error Triton's own fault? A cancellation (the caller left) never is; a timeout only
        when the call had at least `breaker_min_timeout_ms` — a 2 ms client deadline says nothing."""
        status = exc.status() or ""
        if status.endswith("CANCELLED"):
            return False
        if status.endswith("DEADLINE_EXCEEDED"):
            return timeout_s * 1000 >= self.settings.breaker_min_timeout_ms
        return True

    async def _infer(self, model: ServedModel, rows: Sequence[Row], timeout_s: float | None) -> list[Scored]:
        arrays = [np.stack([row[i] for row in rows]) for i in range(3)]
        inputs = []
        for name, array in zip(ranker.INPUTS, arrays, strict=True):
            tensor = triton.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        # explain_steps only when a request of the batch asked for it and the model has it: none otherwise.
        explain = model.explains and any(row[3] for row in rows)
        wanted = ranker.EXPLAINED_OUTPUTS if explain else ranker.OUTPUTS
        cap = self.settings.triton_timeout_ms / 1000
        timeout = min(cap, timeout_s) if timeout_s is not None else cap
        started = time.perf_counter()
        with self.breaker(model.name).call() as call:  # raises CircuitOpen: no call at all
            try:
                result = await self.client.infer(
                    model.name, inputs, model_version=model.version,
                    outputs=[triton.InferRequestedOutput(name) for name in wanted], client_timeout=timeout,
                )
            except InferenceServerException as exc:
                if self._blames_triton(exc, timeout):
                    call.failure()
                raise
            except (ConnectionError, OSError):
                call.failure()
                raise
            call.success()
        self.metrics.stage.labels("triton").observe(time.perf_counter() - started)
        ids, scores = result.as_numpy(ranker.TOP_IDS), result.as_numpy(ranker.TOP_SCORES)
        if not explain:
            return [(ids[i], scores[i], None) for i in range(len(rows))]
        steps = result.as_numpy(ranker.EXPLAIN_STEPS)
        return [(ids[i], scores[i], steps[i] if row[3] else None) for i, row in enumerate(rows)]

    def loaded(self) -> set[ModelKey]:
        return set(self._batchers)

    async def evict(self, keys: set[ModelKey]) -> None:
        """Stop the batchers of versions no longer served (their batches in flight finish first)."""
        for key in keys:
            batcher = self._batchers.pop(key, None)
            if batcher is not None:
                await batcher.stop()
        for name in {key[0] for key in keys} - {key[0] for key in self._batchers}:
            _remove_series(self.metrics.batch_size, name)

    async def stop(self) -> None:
        for batcher in self._batchers.values():
            await batcher.stop()
