"""A small Optuna search over one model's training settings on an interactions CSV, every trial recorded.

    .venv/bin/python -m vitrine.export.tune --interactions beauty.csv -m gru4rec --trials 8 --epochs 8 \
        --out docs/tuning/gru4rec-beauty.csv

Each trial is one `train()` (the same code as `vitrine train`) with early stopping on the validation rows
(`--patience`), so a trial's score is its best epoch's Recall@10 and its `best_epoch` says how long a full
run should train. Trials run one after another (one torch thread each by default: the machine is shared).
The table — parameters, metrics of the kept epoch, epochs run, seconds — is rewritten after every trial,
so an interrupted search keeps what it measured. The score is measured on the same validation rows that
the benchmark reports: choosing among a handful of trials on them is a mild optimistic selection, said
so in docs/benchmarks.md.

Optuna is an optional dependency (`pip install -e '.[tune]'`); nothing else imports this module.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

from vitrine.export.data import interactions, sequences
from vitrine.export.train import TrainConfig, train

FIELDS = ("trial", "max_len", "dim", "batch_size", "dropout", "item_dropout", "learning_rate", "tied", "weight_decay",
          "epochs_run", "best_epoch", "recall@10", "recall@20", "ndcg@10", "mrr", "train_s", "state")


def main(argv: list[str] | None = None) -> None:
    import optuna

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interactions", type=Path, required=True)
    parser.add_argument("-m", "--model", default="gru4rec", choices=("gru4rec", "sasrec"))
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8, help="Most epochs per trial (early stopping may end it sooner).")
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--max-len", type=int, nargs="+", default=[10, 20], help="History lengths to choose from.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--progress", action="store_true", help="A progress bar per trial (on stderr).")
    parser.add_argument("--enqueue", type=json.loads, action="append", default=[],
                        help="A JSON object of parameters tried first (repeatable), e.g. the current defaults.")
    parser.add_argument("--out", type=Path, required=True, help="The trial table (.csv); a .json twin is written beside it.")
    args = parser.parse_args(argv)

    table = interactions.load(args.interactions)
    info = {"source": f"interactions:{args.interactions.name}", "fingerprint": table.fingerprint(), "events": len(table)}
    datasets: dict[int, sequences.Dataset] = {}
    rows: list[dict] = []
    scratch = Path(tempfile.mkdtemp(prefix="vitrine-tune-"))

    def objective(trial: optuna.Trial) -> float:
        max_len = trial.suggest_categorical("max_len", args.max_len)
        if max_len not in datasets:
            datasets[max_len] = sequences.build(table, max_len=max_len, seed=args.seed)
        config = TrainConfig(
            architecture=args.model, epochs=args.epochs, patience=args.patience, max_len=max_len,
            seed=args.seed, threads=args.threads,
            dim=trial.suggest_categorical("dim", [64, 128]),
            batch_size=trial.suggest_categorical("batch_size", [64, 128]),
            dropout=trial.suggest_float("dropout", 0.1, 0.4, step=0.1),
            item_dropout=trial.suggest_float("item_dropout", 0.0, 0.2, step=0.1),
            learning_rate=trial.suggest_float("learning_rate", 2e-3, 1.5e-2, log=True),
            tied=trial.suggest_categorical("tied", [True, False]),
            weight_decay=0.0,
            lr_schedule="constant", warmup=0.0,  # as in the recorded searches (docs/tuning/), before 14.4's schedule
        )
        started = time.monotonic()
        run_dir = train(config, datasets[max_len], info, scratch, progress=args.progress)
        record = json.loads((run_dir / "run.json").read_text())
        metrics = record["metrics"]["model"]
        rows.append({"trial": trial.number, **{k: _tidy(getattr(config, k)) for k in FIELDS[1:9]},
                     "epochs_run": len(record["history"]), "best_epoch": record["best_epoch"],
                     **{k: round(v, 5) for k, v in metrics.items()}, "train_s": round(time.monotonic() - started, 1),
                     "state": "complete"})
        write(rows, args.out, {**info, "model": args.model, "epochs": args.epochs, "patience": args.patience,
                               "baselines": {k: v for k, v in record["metrics"].items() if k != "model"}})
        return metrics["recall@10"]

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=3))
    for params in args.enqueue:
        study.enqueue_trial(params)
    study.optimize(objective, n_trials=args.trials)
    print(f"best trial {study.best_trial.number}: Recall@10 {study.best_value:.4f} with {study.best_params}")


def _tidy(value: object) -> object:
    return round(value, 6) if isinstance(value, float) else value


def write(rows: list[dict], out: Path, meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    out.with_suffix(".json").write_text(json.dumps({**meta, "trials": rows}, indent=2))


if __name__ == "__main__":
    main()
