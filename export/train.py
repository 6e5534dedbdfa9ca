"""`vitrine train`: fit a next-item model, evaluate it against popularity, and record the run.

A run folder holds `model.pt` (weights and the hyper-parameters to rebuild the module), `run.json`
(parameters, data fingerprint, metrics of the model and of the popularity baseline, code version,
duration) and `vocabulary.json`. Training is seeded and deterministic on CPU.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from vitrine.export.data.sequences import FIRST_ITEM, OOV, Dataset
from vitrine.export.models import Architecture, SequenceRecommender, build
from vitrine.settings import REPO_ROOT

METRIC_NAMES = ("recall@10", "recall@20", "ndcg@10", "mrr")
VALIDATION_SAMPLE = "validation_sample.npz"
"""Validation histories kept with the run: the export derives drift-reference distributions from them."""
REFERENCE_ROWS = 5000


@dataclass(frozen=True)
class TrainConfig:
    architecture: Architecture
    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    dim: int = 64
    dropout: float | None = None
    max_len: int = 20
    seed: int = 7
    threads: int = 2

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.dim < 4 or self.max_len < 2:
            raise ValueError("epochs and batch_size must be >= 1, dim >= 4, max_len >= 2")
        if not 0 < self.learning_rate < 1:
            raise ValueError("learning_rate must lie in (0, 1)")


def ranking_metrics(scores: np.ndarray | torch.Tensor, targets: np.ndarray) -> dict[str, float]:
    """Recall@10/20, NDCG@10 and MRR over the full catalogue. A tie counts in the target's favour."""
    scores = torch.as_tensor(scores)
    target = torch.as_tensor(targets)
    target_scores = scores.gather(1, target.unsqueeze(1))
    rank = (scores > target_scores).sum(dim=1).double()  # 0 = first place
    rank = torch.where(target < FIRST_ITEM, torch.full_like(rank, float("inf")), rank)  # never a hit
    return {
        "recall@10": float((rank < 10).double().mean()),
        "recall@20": float((rank < 20).double().mean()),
        "ndcg@10": float(torch.where(rank < 10, 1 / torch.log2(rank + 2), torch.zeros_like(rank)).mean()),
        "mrr": float((1 / (rank + 1)).mean()),
    }


def popularity_scores(dataset: Dataset) -> np.ndarray:
    counts = dataset.train_item_counts.astype(np.float64)
    counts[:FIRST_ITEM] = -np.inf
    return counts


def evaluate(model: SequenceRecommender, dataset: Dataset, batch_size: int = 1024) -> dict[str, float]:
    model.eval()
    totals = dict.fromkeys(METRIC_NAMES, 0.0)
    n = len(dataset.valid_targets)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            items = torch.from_numpy(dataset.valid_inputs[start:stop])
            types = torch.from_numpy(dataset.valid_types[start:stop])
            scores = model.logits(model.encode(items, types)[:, -1])
            for name, value in ranking_metrics(scores, dataset.valid_targets[start:stop]).items():
                totals[name] += value * (stop - start)
    return {name: total / n for name, total in totals.items()}


def evaluate_popularity(dataset: Dataset) -> dict[str, float]:
    scores = np.broadcast_to(popularity_scores(dataset), (len(dataset.valid_targets), dataset.vocabulary.size))
    return ranking_metrics(np.ascontiguousarray(scores), dataset.valid_targets)


def code_version() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        return f"{rev}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def train(config: TrainConfig, dataset: Dataset, data_info: dict[str, object], out_dir: Path, progress: bool = True) -> Path:
    """Train one model, write its run folder, and return the folder."""
    started = time.monotonic()
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    model = build(config.architecture, dataset.vocabulary.size, dataset.max_len, config.dim, config.dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    loss_fn = nn.CrossEntropyLoss(ignore_index=0)
    inputs = torch.from_numpy(dataset.train_inputs)
    types = torch.from_numpy(dataset.train_types)
    targets = torch.from_numpy(dataset.train_targets)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    batches = (len(inputs) + config.batch_size - 1) // config.batch_size
    bar = tqdm(total=config.epochs * batches, desc=config.architecture, unit="batch", disable=not progress)
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        epoch_loss = 0.0
        for start in range(0, len(inputs), config.batch_size):
            index = order[start : start + config.batch_size]
            logits = model.logits(model.encode(inputs[index], types[index]))
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), targets[index].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_loss += loss.item() * len(index)
            bar.update(1)
        history.append({"epoch": epoch + 1, "loss": epoch_loss / len(inputs)})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    bar.close()
    metrics = evaluate(model, dataset)
    baseline = evaluate_popularity(dataset)

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
        "metrics": {"model": metrics, "popularity": baseline},
        "history": history,
        "code_version": code_version(),
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 2),
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
    model = build(config.architecture, saved["n_items"], config.max_len, config.dim, config.dropout)
    model.load_state_dict(saved["state_dict"])
    model.eval()
    return model, json.loads((run_dir / "run.json").read_text()), tuple(json.loads((run_dir / "vocabulary.json").read_text()))
