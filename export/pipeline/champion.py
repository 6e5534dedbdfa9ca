"""The champion: the registry's `champion` alias for a model name (its Triton version), rebuilt from the version's
`metadata.json` and re-measured on the candidate's held-out rows.

Only when the registry has no champion alias for the model (or does not answer, or the aliased version's folder is
gone from the repository) is it the newest version Triton reports ready, and the record says so (`source`).

Why re-measure instead of copying the champion's old numbers: they were measured on older data, with
another vocabulary and cutoff, so they say nothing about the newest slice. The champion's `metadata.json`
(written by the export) carries its vocabulary and serving shape; its `model.onnx` runs in-process under
onnxruntime on the candidate's validation histories, each item mapped through the champion's vocabulary
(an item it never saw is its unknown id, as in serving).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException

from vitrine.contracts import ranker
from vitrine.export.data.sequences import FIRST_ITEM, OOV, PAD, Dataset
from vitrine.export.metrics import EVAL_BATCH, batches
from vitrine.export.triton_repository import versions


REGISTRY_SOURCE = "registry alias champion"
NEWEST_READY = "newest version Triton reports ready"


@dataclass(frozen=True)
class Champion:
    model: str
    version: int
    folder: Path
    vocabulary: tuple[str, ...]
    max_len: int
    max_k: int
    record: dict
    source: str = REGISTRY_SOURCE
    """Where the choice came from: the registry's alias, or why the newest ready version was taken instead."""

    @property
    def vocabulary_set(self) -> set[str]:
        return set(self.vocabulary)


async def served_version(grpc_url: str, model: str, on_disk: list[int]) -> int | None:
    """The newest version of `model` that Triton reports ready (what a gateway asking for "newest" gets)."""
    client = triton.InferenceServerClient(grpc_url)
    try:
        for version in sorted(on_disk, reverse=True):
            try:
                if await client.is_model_ready(model, str(version)):
                    return version
            except InferenceServerException:
                continue
        return None
    finally:
        await client.close()


def choose(registry_version: int | None, registry_note: str, on_disk: list[int]) -> tuple[int | None, str]:
    """The champion's Triton version by the rule above, and its source; (None, why) when the newest ready version
    must be asked of Triton. `registry_note` says why the registry named none (no alias, registry down)."""
    if registry_version is not None:
        if registry_version in on_disk:
            return registry_version, REGISTRY_SOURCE
        return None, (f"{NEWEST_READY}: the registry's champion is Triton version {registry_version}, "
                      "which is not in the model repository")
    return None, f"{NEWEST_READY} ({registry_note})"


async def find_champion(grpc_url: str, repository: Path, model: str, registry_version: int | None = None,
                        registry_note: str = "the registry has no champion alias") -> Champion | None:
    """The registry's champion (`registry_version`, its Triton version) when it is in the repository; otherwise the
    newest version Triton reports ready, with the reason in `source`. None when there is neither; raises when Triton
    must be asked and cannot be."""
    folder = repository / model
    on_disk = versions(folder)
    version, source = choose(registry_version, registry_note, on_disk)
    if version is None:
        version = await served_version(grpc_url, model, on_disk)
    if version is None:
        return None
    card = json.loads((folder / str(version) / ranker.METADATA_FILE).read_text())
    return Champion(model=model, version=version, folder=folder / str(version), vocabulary=tuple(card["vocabulary"]),
                    max_len=int(card["serving"]["max_len"]), max_k=int(card["serving"]["max_k"]), record=card.get("run", {}),
                    source=source)


def _reencode(dataset: Dataset, champion: Champion) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The candidate's validation rows in the champion's ids and history length."""
    index = {item: i + FIRST_ITEM for i, item in enumerate(champion.vocabulary)}
    lookup = np.array([PAD, OOV] + [index.get(item, OOV) for item in dataset.vocabulary.item_ids], dtype=np.int64)
    items, types = lookup[dataset.valid_inputs], dataset.valid_types
    length = items.shape[1]
    if champion.max_len <= length:
        items, types = items[:, length - champion.max_len:], types[:, length - champion.max_len:]
    else:  # the champion could see more steps than the candidate kept: left-pad
        pad = np.zeros((len(items), champion.max_len - length), dtype=np.int64)
        items, types = np.hstack([pad, items]), np.hstack([pad, types])
    targets = np.array([index.get(item, OOV) for item in dataset.valid_target_ids.tolist()], dtype=np.int64)  # type: ignore[union-attr]
    return items, types.astype(np.int64), targets


def topk_ranks(top_ids: np.ndarray, top_scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each target within a top-k answer; infinity when absent, blocked or unknown."""
    hit = (top_ids == targets[:, None]) & (top_scores > ranker.EXCLUDED_SCORE) & (targets[:, None] >= FIRST_ITEM)
    return np.where(hit.any(axis=1), hit.argmax(axis=1).astype(float), np.inf)


def champion_ranks(dataset: Dataset, champion: Champion, threads: int = 1) -> np.ndarray:
    """Ranks of the candidate's validation targets under the served champion's model.onnx."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(champion.folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    items, types, targets = _reencode(dataset, champion)
    ranks = np.full(len(targets), np.inf)
    for start, stop in batches(len(targets), EVAL_BATCH):
        feed = {ranker.ITEM_IDS: items[start:stop], ranker.EVENT_TYPES: types[start:stop],
                ranker.EXCLUDE_IDS: np.zeros((stop - start, 1), dtype=np.int64)}
        top_ids, top_scores = session.run(list(ranker.OUTPUTS), feed)
        ranks[start:stop] = topk_ranks(top_ids, top_scores, targets[start:stop])
    return ranks
