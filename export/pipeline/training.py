"""Step 2, train: each configured architecture on the window's events, seeded (`export/train.py` writes the run
folders; the pipeline keeps them under its run's folder so that resume and reproduce find them)."""

from __future__ import annotations

from pathlib import Path

from vitrine.export.data import sequences
from vitrine.export.data.table import EventTable
from vitrine.export.pipeline.slices import CategoryOf, with_categories
from vitrine.export.train import TrainConfig, train
from vitrine.settings import PipelineSettings


LEGACY_DROPOUT = {"gru4rec": 0.1, "sasrec": 0.2}
"""The dropout runs recorded before issue 14.4 trained with (their records name no dropout, no schedule and no tying;
they were tied)."""


def train_config(architecture: str, params: dict) -> TrainConfig:
    legacy = "lr_schedule" not in params  # recorded before 14.4: a constant rate and the dropout of then
    return TrainConfig(architecture=architecture, epochs=params["epochs"], batch_size=params["batch_size"],  # type: ignore[arg-type]
                       learning_rate=params["learning_rate"], dim=params["dim"], max_len=params["max_len"],
                       seed=params["seed"], threads=params["threads"],
                       dropout=LEGACY_DROPOUT[architecture] if legacy else None,
                       tied=True if legacy else params.get("tied", False),
                       lr_schedule="constant" if legacy else params["lr_schedule"],
                       warmup=0.0 if legacy else params["warmup"])


def training_params(settings: PipelineSettings) -> dict:
    """The parameters a run records (and `reproduce` uses again)."""
    return {"models": list(settings.models), "epochs": settings.epochs, "batch_size": settings.batch_size,
            "learning_rate": settings.learning_rate, "dim": settings.dim, "max_len": settings.max_len,
            "validation_fraction": settings.validation_fraction, "seed": settings.seed, "threads": settings.threads,
            "lr_schedule": settings.lr_schedule, "warmup": settings.warmup, "tied": TrainConfig.tied}


def build_dataset(table: EventTable, params: dict, category_of: CategoryOf | None) -> tuple[sequences.Dataset, str]:
    """The same split for training, the champion and reproduce: `sequences.build` is deterministic."""
    dataset = sequences.build(table, max_len=params["max_len"], validation_fraction=params["validation_fraction"], seed=params["seed"])
    return with_categories(dataset, category_of)


def train_all(dataset: sequences.Dataset, data_info: dict, params: dict, out: Path) -> dict[str, str]:
    """architecture → run folder."""
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for architecture in params["models"]:
        run_dir = train(train_config(architecture, params), dataset, data_info, out, progress=False)
        runs[architecture] = str(run_dir)
    return runs

