"""`vitrine export`: a trained run → ONNX with top-k in the graph → parity-checked → a new version in
the Triton repository, with `metadata.json` (run record, vocabulary, reference distributions, and
`baselines`: every baseline's metrics beside the model's, the strongest named).

The export fails, and writes nothing, when onnxruntime disagrees with torch on fresh random inputs
(scores beyond 1e-4, different top-k ids other than among tied scores, or different explanation steps
other than among steps whose similarity ties).

Every export has the `explain_steps` output. Triton's config is one per model, so it declares the output only
when every version the model keeps has it: a model whose folder still holds a version exported before it
(the committed v1 models) keeps serving without explanations until that version is pruned.
"""

from __future__ import annotations

import io
import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from vitrine.contracts import ranker
from vitrine.contracts.events import NUM_EVENT_TYPES
from vitrine.export.data.sequences import FIRST_ITEM, OOV, PAD
from vitrine.export.drift import SOURCE_VALIDATION, build_reference, history_stats, popularity_counts, popularity_upper_index
from vitrine.export.models import NEG, ServingRanker, explain_steps, step_similarities
from vitrine.export.topk import unexplained_id_differences
from vitrine.export.train import VALIDATION_SAMPLE, load_run
from vitrine.export.registry import METADATA_PARAMETER_PREFIX, metadata_parameter
from vitrine.export.triton_repository import (
    ModelSpec,
    TensorSpec,
    add_version,
    config_parameters,
    production_config,
    prune,
    prunable,
    versions,
    write_model_folder,
)
from vitrine.export.validate import ModelFolderError, validate_model_folder

OPSET = 17
SCORE_TOLERANCE = 1e-4
PARITY_BATCH_SIZES = (1, 3, 17, 64)



class ParityError(AssertionError):
    """onnxruntime and torch disagree: the ONNX graph must not be served."""


@dataclass(frozen=True)
class ExportResult:
    model: str
    version: int
    folder: Path
    removed_versions: list[int]
    max_abs_score_diff: float
    metadata_uri: str | None = None
    """Where the version's metadata lives in the registry (also in its Triton config); None without a registry."""


Publish = Callable[[str, int, dict[str, bytes]], str]
"""(model name, Triton version, files by name) → the metadata URI: uploads a version's files to the registry
before the version is written, so that its config can say where its metadata lives."""


def spec_for(name: str, max_len: int, max_k: int, keep_versions: int, explain: bool = True) -> ModelSpec:
    """`explain`: declare the `explain_steps` output (only when every version of the model has it)."""
    i64, f32 = np.dtype(np.int64), np.dtype(np.float32)
    outputs = (TensorSpec(ranker.TOP_IDS, i64, (max_k,)), TensorSpec(ranker.TOP_SCORES, f32, (max_k,)))
    if explain:
        outputs += (TensorSpec(ranker.EXPLAIN_STEPS, i64, (max_k,)),)
    return ModelSpec(
        name=name,
        inputs=(
            TensorSpec(ranker.ITEM_IDS, i64, (max_len,)),
            TensorSpec(ranker.EVENT_TYPES, i64, (max_len,)),
            TensorSpec(ranker.EXCLUDE_IDS, i64, (-1,)),
        ),
        outputs=outputs,
        max_batch_size=128,
        preferred_batch_sizes=(8, 32, 64, 128),
        max_queue_delay_us=500,
        keep_versions=keep_versions,
        tensorrt_fp16=True,
    )


def to_onnx(serving: ServingRanker, max_len: int) -> bytes:
    serving.eval()
    example = (
        torch.full((2, max_len), PAD, dtype=torch.long),
        torch.full((2, max_len), PAD, dtype=torch.long),
        torch.zeros((2, 3), dtype=torch.long),
    )
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            serving, example, buffer, dynamo=False, opset_version=OPSET,
            input_names=list(ranker.INPUTS), output_names=list(ranker.EXPLAINED_OUTPUTS),
            dynamic_axes={
                ranker.ITEM_IDS: {0: "batch"}, ranker.EVENT_TYPES: {0: "batch"},
                ranker.EXCLUDE_IDS: {0: "batch", 1: "excluded"},
                ranker.TOP_IDS: {0: "batch"}, ranker.TOP_SCORES: {0: "batch"}, ranker.EXPLAIN_STEPS: {0: "batch"},
            },
        )
    return buffer.getvalue()


def random_inputs(rng: np.random.Generator, batch: int, max_len: int, n_items: int) -> dict[str, np.ndarray]:
    """Histories of random length (some empty, some with unknown items) and random exclusions."""
    items = rng.integers(FIRST_ITEM, n_items, size=(batch, max_len))
    items[rng.random((batch, max_len)) < 0.05] = OOV
    types = rng.integers(1, NUM_EVENT_TYPES + 1, size=(batch, max_len))
    lengths = rng.integers(0, max_len + 1, size=batch)
    for row, length in enumerate(lengths):
        items[row, : max_len - length] = PAD
        types[row, : max_len - length] = PAD
    exclude = rng.integers(0, n_items, size=(batch, int(rng.integers(1, 12))))
    return {ranker.ITEM_IDS: items, ranker.EVENT_TYPES: types, ranker.EXCLUDE_IDS: exclude}


def unexplained_step_differences(serving: ServingRanker, item_ids: np.ndarray, top_ids: np.ndarray,
                                 expected_steps: np.ndarray, got_steps: np.ndarray,
                                 tolerance: float = SCORE_TOLERANCE) -> np.ndarray:
    """Mask (batch, k) of the slots whose explanation step differs from the reference without a tie: both must
    be -1 together, or name history positions whose similarity to the item (under the reference model) ties
    within `tolerance`."""
    expected_steps, got_steps = np.asarray(expected_steps), np.asarray(got_steps)
    with torch.no_grad():
        similarity = step_similarities(serving.model.output_table, torch.from_numpy(item_ids),
                                       torch.from_numpy(np.asarray(top_ids))).numpy()
    bad = np.zeros(got_steps.shape, dtype=bool)
    for row, col in zip(*np.nonzero(got_steps != expected_steps), strict=True):
        want, got = int(expected_steps[row, col]), int(got_steps[row, col])
        if min(want, got) < 0 or got >= item_ids.shape[1]:
            bad[row, col] = True
        else:
            bad[row, col] = abs(float(similarity[row, col, got]) - float(similarity[row, col, want])) > tolerance
    return bad


def check_parity(serving: ServingRanker, onnx_bytes: bytes, max_len: int, seed: int = 0) -> float:
    """Largest absolute score difference; raises ParityError when the graphs disagree."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = 0.0
    for batch in PARITY_BATCH_SIZES:
        feed = random_inputs(rng, batch, max_len, serving.model.n_items)
        with torch.no_grad():
            ids_t, scores_t, steps_t = (t.numpy() for t in serving(*(torch.from_numpy(feed[n]) for n in ranker.INPUTS)))
        ids_o, scores_o, steps_o = session.run(list(ranker.EXPLAINED_OUTPUTS), feed)
        diff = float(np.max(np.abs(scores_o - scores_t)))
        worst = max(worst, diff)
        if diff > SCORE_TOLERANCE:
            raise ParityError(f"batch {batch}: top-k scores differ by {diff:.2e} > {SCORE_TOLERANCE:g}")
        # Different ids are acceptable only where their full-catalogue scores tie within tolerance.
        if np.any(ids_o != ids_t):
            with torch.no_grad():
                full = serving.model.logits(serving.model.encode(torch.from_numpy(feed[ranker.ITEM_IDS]), torch.from_numpy(feed[ranker.EVENT_TYPES]))[:, -1])
            full = full.scatter(1, torch.from_numpy(feed[ranker.EXCLUDE_IDS]), NEG).numpy()  # as ServingRanker does
            bad = unexplained_id_differences(ids_t, scores_t, ids_o, SCORE_TOLERANCE, full_scores=full)
            if np.any(bad):
                raise ParityError(f"batch {batch}: {int(bad.sum())} top-k ids differ without a tie")
        # Explanations are compared for the items onnxruntime returned (the torch reference is recomputed for
        # them, so that a tie-broken id swap does not count as an explanation difference).
        with torch.no_grad():
            steps_ref = explain_steps(serving.model.output_table, torch.from_numpy(feed[ranker.ITEM_IDS]),
                                      torch.from_numpy(ids_o)).numpy()
        if np.any((ids_o == ids_t) & (steps_t != steps_ref)):
            raise ParityError(f"batch {batch}: torch's explanation steps are not those of its own top-k")
        bad_steps = unexplained_step_differences(serving, feed[ranker.ITEM_IDS], ids_o, steps_ref, steps_o)
        if np.any(bad_steps):
            raise ParityError(f"batch {batch}: {int(bad_steps.sum())} explanation steps differ without a tie")
    return worst


def reference_distributions(serving: ServingRanker, items: np.ndarray, types: np.ndarray) -> dict[str, object]:
    """What inputs and outputs looked like on validation data (source "validation"): the drift baseline of the
    gateway's `metadata` mode; its default, `capture`, takes the version's first requests in serving instead."""
    lengths, unknown, real = history_stats(items)
    upper_index = popularity_upper_index(serving.model.n_items)
    with torch.no_grad():
        _, scores, _ = serving(torch.from_numpy(items), torch.from_numpy(types), torch.zeros((len(items), 1), dtype=torch.long))
    return build_reference(lengths, unknown, real, popularity_counts(items, upper_index), scores[:, 0].numpy(),
                           items.shape[1], upper_index, SOURCE_VALIDATION)


def _check_compatible(folder: Path, spec: ModelSpec) -> None:
    """All versions of a model share one config: a run with other shapes must be exported under another name."""
    if not versions(folder) or not (folder / "config.pbtxt").exists():
        return
    existing = text_format.Parse((folder / "config.pbtxt").read_text(), mc.ModelConfig())
    wanted = production_config(spec)
    # explain_steps is declared only once every version has it: its presence alone is no incompatibility.
    base = lambda config: [t for t in config.output if t.name != ranker.EXPLAIN_STEPS]  # noqa: E731
    if list(existing.input) != list(wanted.input) or base(existing) != base(wanted):
        raise ModelFolderError(
            f"model {folder.name}: this run's tensors ({_shapes(wanted)}) differ from the served versions' "
            f"({_shapes(existing)}); export it under another name (--name) or with matching max_len/max_k"
        )


def _shapes(config: mc.ModelConfig) -> str:
    return ", ".join(f"{t.name}{list(t.dims)}" for t in [*config.input, *config.output])


def has_explanations(onnx_path: Path) -> bool:
    """Does this version's graph have the `explain_steps` output (versions exported before it do not)?"""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return ranker.EXPLAIN_STEPS in {o.name for o in session.get_outputs()}


def _metadata_parameters(folder: Path, kept: list[int], new_version: int, uri: str | None) -> tuple[tuple[str, str], ...]:
    """The config's per-version metadata URIs: those of versions still kept, plus the new one's."""
    existing = {k: v for k, v in config_parameters(folder).items() if k.startswith(METADATA_PARAMETER_PREFIX)}
    wanted = {metadata_parameter(v) for v in kept}
    merged = {k: v for k, v in existing.items() if k in wanted}
    if uri is not None:
        merged[metadata_parameter(new_version)] = uri
    return tuple(sorted(merged.items()))


def export_run(
    run_dir: Path,
    repository: Path,
    name: str | None = None,
    max_k: int = 50,
    keep_versions: int = 3,
    publish: Publish | None = None,
    protected: frozenset[int] = frozenset(),
) -> ExportResult:
    """Export one run as the next version of model `name` (default: the run's architecture).

    With `publish` (the registry), the version's files are uploaded first and its config carries their URI
    (`parameters { key: "vitrine.metadata.<version>" }`): the gateway learns the vocabulary and drift reference
    from Triton's config API and the registry, without reading the model repository's files."""
    model, record, vocabulary = load_run(run_dir)
    max_len = int(record["parameters"]["max_len"])
    serving = ServingRanker(model, k=max_k)
    onnx_bytes = to_onnx(serving, max_len)
    worst = check_parity(serving, onnx_bytes, max_len)
    metadata: dict[str, object] = {
        "run": record,
        "serving": {"max_len": max_len, "max_k": serving.k, "pad_id": PAD, "unknown_id": OOV, "explain_steps": True,
                    "first_item_id": FIRST_ITEM, "excluded_score": ranker.EXCLUDED_SCORE,
                    "parity_max_abs_score_diff": worst},
        "vocabulary": list(vocabulary),
    }
    if "baselines" in record:  # the model card: how this model compares with counting, on the same data
        metadata["baselines"] = {**record["baselines"], "model": record["metrics"]["model"]}
    sample = np.load(run_dir / VALIDATION_SAMPLE)
    metadata["reference"] = reference_distributions(serving, sample["items"], sample["types"])
    model_name = name or record["model"]
    spec = spec_for(model_name, max_len, serving.k, keep_versions)
    _check_compatible(repository / model_name, spec)
    metadata_bytes = json.dumps(metadata).encode()
    number = max(versions(repository / model_name), default=0) + 1
    uri = publish(model_name, number, {"model.onnx": onnx_bytes, ranker.METADATA_FILE: metadata_bytes}) if publish else None
    on_disk = [*versions(repository / model_name), number]
    gone = set(prunable(on_disk, keep_versions, protected))
    kept = [v for v in on_disk if v not in gone]
    if kept != on_disk[-keep_versions:]:  # a protected version older than the newest keep_versions: serve it too
        spec = replace(spec, served_versions=tuple(kept))
    # The config declares explain_steps only when every version in the folder has it (this one does); once the
    # versions without it are pruned (below), the config is rewritten to declare it.
    with_steps = {v: has_explanations(repository / model_name / str(v) / "model.onnx") for v in versions(repository / model_name)}
    explain = all(with_steps.values())
    spec = replace(spec, outputs=spec_for(model_name, max_len, serving.k, keep_versions, explain).outputs,
                   parameters=_metadata_parameters(repository / model_name, kept, number, uri))
    folder = write_model_folder(repository, spec)
    version = add_version(folder, onnx_bytes, version=number, extra_files={ranker.METADATA_FILE: metadata_bytes})
    try:
        validate_model_folder(folder)
    except Exception:
        shutil.rmtree(version)
        raise
    removed = prune(folder, keep_versions, protected)
    if not explain and all(with_steps.get(v, True) for v in versions(folder)):  # the new version has them
        write_model_folder(repository, replace(spec, outputs=spec_for(model_name, max_len, serving.k, keep_versions, True).outputs))
        validate_model_folder(folder)
    return ExportResult(model_name, int(version.name), version, removed, worst, uri)
