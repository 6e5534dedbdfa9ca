"""`vitrine train`: fit a next-item model, evaluate it against strong simple baselines, and record the run.

A run folder holds `model.pt` (weights and the hyper-parameters to rebuild the module), `run.json`
(parameters, data fingerprint, metrics of the model and of every baseline in `baselines.py` — overall
and per slice, the strongest named — code version, duration) and `vocabulary.json`. Training is
seeded and deterministic on CPU.
"""

from __future__ import annotations

import copy
import ctypes
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from tqdm import tqdm

from vitrine.export.baselines import BaselineConfig, evaluate_baselines
from vitrine.export.data.sequences import OOV, PAD, Dataset
from vitrine.export.losses import LOSSES, Loss, draw_negatives, full_softmax_loss, proposal, sampled_softmax_loss
from vitrine.export.metrics import EVAL_BATCH, METRIC_NAMES, SlicedMetrics, batches, ranking_metrics
from vitrine.export.models import Architecture, SequenceRecommender, build
from vitrine.settings import LrSchedule
from vitrine.settings import REPO_ROOT

DEFAULT_DIM: dict[str, int] = {"gru4rec": 64, "sasrec": 128}
"""Tuned on the default storefront (docs/benchmarks.md, Training): SASRec gains from 128 (Recall@10 0.657 → 0.667,
the long tail within 4 % of the transition table instead of 10 %), GRU4Rec overfits there (0.658 → 0.651)."""

DEFAULTS: dict[str, dict[str, int | float]] = {
    "gru4rec": {"epochs": 10, "batch_size": 64, "learning_rate": 8e-3, "dropout": 0.1},
    "sasrec": {"epochs": 7, "batch_size": 32, "learning_rate": 5e-3, "dropout": 0.05},
}
"""What `TrainConfig` fields left at None become, per architecture (with the cosine schedule and 5 % warm-up). Chosen
for training time (issue 14.4, docs/benchmarks.md "Training time (item 4), new defaults"): on the `wide` preset each
model trains in under two minutes (79–84 and 98–113 CPU s with one thread) at overall and long-tail metrics at least those
of the earlier 20 epochs at a constant 3e-3 (batch 128, tied tables; SASRec dropout 0.2) — smaller batches take more
optimizer steps per pass over the data, SASRec leaves its popularity plateau sooner with them, little dropout suits a
short run, and untied output tables (`TrainConfig.tied`) keep the long tail."""

STOPPING_METRIC = "recall@10"
"""What early stopping (`TrainConfig.patience`) watches on the validation rows."""

VALIDATION_SAMPLE = "validation_sample.npz"
"""Validation histories kept with the run: the export derives drift-reference distributions from them."""
REFERENCE_ROWS = 5000

SCHEDULES: tuple[LrSchedule, ...] = get_args(LrSchedule)


def lr_factor(step: int, total_steps: int, schedule: LrSchedule, warmup: float) -> float:
    """The learning rate of optimizer step `step` (0-based, of `total_steps`) as a share of the configured one.

    The first `warmup` share of the steps ramps linearly up to the full rate (step i of w warm-up steps: (i + 1) / w);
    after that "constant" keeps it and "cosine" decays it along half a cosine towards 0 at the last step
    ((1 + cos(pi * p)) / 2, p = 0 at the first step after warm-up and 1 one step past the last).
    """
    warm = math.ceil(warmup * total_steps)
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, total_steps - warm)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class TrainConfig:
    architecture: Architecture
    epochs: int | None = None
    """None (also for batch_size, learning_rate and dropout): the architecture's default (`DEFAULTS`)."""
    batch_size: int | None = None
    learning_rate: float | None = None
    weight_decay: float = 0.0
    dim: int | None = None
    """Embedding and hidden size; None: the architecture's tuned default (`DEFAULT_DIM`)."""
    dropout: float | None = None
    tied: bool = False
    """Score items with their input embeddings (True) or with an output table of their own (False: the default since
    issue 14.4 — with the short schedule it keeps the long tail that tied tables lost, docs/benchmarks.md)."""
    max_len: int = 20
    seed: int = 7
    threads: int = 2
    loss: Loss = "full"
    """"full": softmax over the whole catalogue at every position; "sampled": the target against
    `negatives` shared sampled items with the logQ correction (export/losses.py). Evaluation and the
    exported graph always score the full catalogue."""
    negatives: int = 512
    sampling_alpha: float = 0.0
    """Negatives are drawn with probability ∝ training count ** sampling_alpha (0: uniform)."""
    item_dropout: float = 0.0
    """Training only: each real input step's item is replaced by the unknown-item id with this probability
    (the step's event type stays), so that the model cannot lean on one memorised item id."""
    adam_beta2: float = 0.999
    """Adam's second-moment decay: lower forgets the large gradients of the first steps sooner."""
    loss_share: float = 1.0
    """Training only: each batch's loss scores a random share of the real positions (1: all of them) — the
    catalogue softmax costs in proportion."""
    lr_schedule: LrSchedule = "cosine"
    """Learning rate over the run's `epochs` × batches steps (`lr_factor`): "constant", or "cosine" (decays to 0 by
    the last step). With early stopping the schedule still spans `epochs`."""
    warmup: float = 0.05
    """Share of the steps over which the learning rate ramps linearly up from near 0 (either schedule)."""
    patience: int = 0
    """Early stopping: 0 trains every epoch; n > 0 scores the validation rows after each epoch, stops after n
    epochs without a better `STOPPING_METRIC`, and keeps the best epoch's weights (recorded as `best_epoch`)."""

    def __post_init__(self) -> None:
        if self.architecture not in DEFAULT_DIM:
            raise ValueError(f"unknown architecture {self.architecture!r}; choose one of {', '.join(DEFAULT_DIM)}")
        if self.dim is None:
            object.__setattr__(self, "dim", DEFAULT_DIM[self.architecture])
        for name, value in DEFAULTS[self.architecture].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must lie in [0, 1)")
        if self.epochs < 1 or self.batch_size < 1 or self.dim < 4 or self.max_len < 2:
            raise ValueError("epochs and batch_size must be >= 1, dim >= 4, max_len >= 2")
        if not 0 < self.learning_rate < 1:
            raise ValueError("learning_rate must lie in (0, 1)")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}")
        if not 1 <= self.negatives <= 100_000 or not 0 <= self.sampling_alpha <= 1:
            raise ValueError("negatives must lie in [1, 100000] and sampling_alpha in [0, 1]")
        if not 0 <= self.item_dropout < 1 or self.patience < 0:
            raise ValueError("item_dropout must lie in [0, 1) and patience be >= 0")
        if not 0 < self.adam_beta2 < 1:
            raise ValueError("adam_beta2 must lie in (0, 1)")
        if not 0 < self.loss_share <= 1:
            raise ValueError("loss_share must lie in (0, 1]")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup < 1:
            raise ValueError("warmup must lie in [0, 1)")


__all__ = ["METRIC_NAMES", "ranking_metrics"]  # kept importable from here: they moved to metrics.py


def evaluate_sliced(model: SequenceRecommender, dataset: Dataset, batch_size: int = EVAL_BATCH) -> SlicedMetrics:
    """The model's validation ranks, for metrics overall and per slice (the gate needs both)."""
    model.eval()
    sliced = SlicedMetrics(dataset)
    with torch.no_grad():
        for start, stop in batches(len(dataset.valid_targets), batch_size):
            items = torch.from_numpy(dataset.valid_inputs[start:stop])
            types = torch.from_numpy(dataset.valid_types[start:stop])
            sliced.add(start, model.logits(model.encode(items, types)[:, -1]))
    return sliced


def evaluate(model: SequenceRecommender, dataset: Dataset, batch_size: int = EVAL_BATCH) -> dict[str, float]:
    return evaluate_sliced(model, dataset, batch_size).overall()


def keep_freed_memory() -> bool:
    """Process-wide, glibc only: allocate large blocks from the heap and keep freed memory for reuse.

    By default glibc maps every allocation above 32 MB afresh and unmaps it when freed. A training batch's
    [positions × catalogue] logits and their gradients (≈ 85 MB each on the `wide` preset) are such blocks, so
    every batch faults their pages in again: on `wide`, 108 s of system time against 160 s of arithmetic for
    GRU4Rec (docs/benchmarks.md, Training). Kept, the same blocks are reused; the price is that the process
    keeps its peak memory until it exits. Returns whether the setting applied (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def drop_items(items: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Item-id dropout: each real step (not padding) becomes the unknown item with probability `rate`."""
    if rate <= 0:
        return items
    hit = (torch.rand(items.shape, generator=generator) < rate) & (items != PAD)
    return items.masked_fill(hit, OOV)


def code_version() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        return f"{rev}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def train(config: TrainConfig, dataset: Dataset, data_info: dict[str, object], out_dir: Path, progress: bool = True,
          baselines: BaselineConfig = BaselineConfig()) -> Path:
    """Train one model, write its run folder, and return the folder."""
    started = time.monotonic()
    keep_freed_memory()
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    model = build(config.architecture, dataset.vocabulary.size, dataset.max_len, config.dim, config.dropout, config.tied)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, betas=(0.9, config.adam_beta2),
                                 weight_decay=config.weight_decay)
    inputs = torch.from_numpy(dataset.train_inputs)
    types = torch.from_numpy(dataset.train_types)
    targets = torch.from_numpy(dataset.train_targets)
    generator = torch.Generator().manual_seed(config.seed)
    q = proposal(dataset.train_item_counts, config.sampling_alpha) if config.loss == "sampled" else None
    history: list[dict[str, float]] = []
    best: tuple[int, float, dict] | None = None  # (epoch, score, weights) under early stopping
    batches = (len(inputs) + config.batch_size - 1) // config.batch_size
    total_steps = config.epochs * batches
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, config.lr_schedule, config.warmup))
    last_lr = scheduler.get_last_lr()[0]
    bar = tqdm(total=config.epochs * batches, desc=config.architecture, unit="batch", disable=not progress)
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        epoch_loss = 0.0
        for start in range(0, len(inputs), config.batch_size):
            index = order[start : start + config.batch_size]
            real = targets[index] != 0  # only real positions are scored (left padding has no target)
            if config.loss_share < 1:  # no draw at 1: the default run's random stream is unchanged
                real &= torch.rand(real.shape, generator=generator) < config.loss_share
                if not real.any():  # an empty draw would make the loss NaN
                    bar.update(1)
                    continue
            steps = drop_items(inputs[index], config.item_dropout, generator)
            hidden, target = model.encode(steps, types[index])[real], targets[index][real]
            if q is None:
                loss = full_softmax_loss(hidden, target, model.output_table)
            else:
                loss = sampled_softmax_loss(hidden, target, model.output_table,
                                            draw_negatives(q, config.negatives, generator), q)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            last_lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            epoch_loss += loss.item() * len(index)
            bar.update(1)
        history.append({"epoch": epoch + 1, "loss": epoch_loss / len(inputs), "last_lr": last_lr})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
        if config.patience:
            score = evaluate(model, dataset)[STOPPING_METRIC]
            history[-1][f"valid_{STOPPING_METRIC}"] = score
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", valid=f"{score:.4f}")
            if best is None or score > best[1]:
                best = (epoch + 1, score, copy.deepcopy(model.state_dict()))
            elif epoch + 1 - best[0] >= config.patience:
                break
    bar.close()
    if best is not None:
        model.load_state_dict(best[2])  # the best epoch's weights are the run's model
    sliced = evaluate_sliced(model, dataset)
    metrics = sliced.overall()
    baselines_started = time.monotonic()
    report = evaluate_baselines(dataset, baselines)  # same rows, vocabulary, metrics and slices as the model
    baselines_s = time.monotonic() - baselines_started

    run_dir = out_dir / f"{config.architecture}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{data_info['fingerprint'][:8]}"
    run_dir.mkdir(parents=True, exist_ok=False)
    torch.save({"config": asdict(config), "n_items": dataset.vocabulary.size, "state_dict": model.state_dict()}, run_dir / "model.pt")
    (run_dir / "vocabulary.json").write_text(json.dumps(list(dataset.vocabulary.item_ids)))
    every = max(1, len(dataset.valid_targets) // REFERENCE_ROWS)
    np.savez_compressed(run_dir / VALIDATION_SAMPLE, items=dataset.valid_inputs[::every][:REFERENCE_ROWS],
                        types=dataset.valid_types[::every][:REFERENCE_ROWS])
    record = {
        "model": config.architecture,
        "parameters": asdict(config),
        "data": {**data_info, "cutoff_ms": dataset.cutoff_ms, "train_windows": len(inputs),
                 "validation_targets": len(dataset.valid_targets), "vocabulary": len(dataset.vocabulary.item_ids),
                 "validation_oov_share": float(np.mean(dataset.valid_targets == OOV))},
        "metrics": {"model": metrics, **report.metrics},
        "baselines": {**report.as_record(), "duration_s": round(baselines_s, 2)},
        "slice_metrics": {"model": sliced.slices(), **report.slices},
        "history": history,
        "best_epoch": best[0] if best is not None else len(history),
        "code_version": code_version(),
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started - baselines_s, 2),  # training and the model's evaluation
    }
    (run_dir / "run.json").write_text(json.dumps(record, indent=2))
    return run_dir


def load_run(run_dir: Path) -> tuple[SequenceRecommender, dict, tuple[str, ...]]:
    """Rebuild the trained module of a run folder, with its record and vocabulary."""
    for name in ("model.pt", "run.json", "vocabulary.json", VALIDATION_SAMPLE):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir} is not a complete run folder: {name} is missing")
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    config = TrainConfig(**saved["config"])
    model = build(config.architecture, saved["n_items"], config.max_len, config.dim, config.dropout, config.tied)
    model.load_state_dict(saved["state_dict"])
    model.eval()
    return model, json.loads((run_dir / "run.json").read_text()), tuple(json.loads((run_dir / "vocabulary.json").read_text()))
