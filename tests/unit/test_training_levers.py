"""Training levers of issue 14.3: early stopping on the validation rows and item-id dropout."""

import copy
import json
from pathlib import Path

import pytest
import torch

from vitrine.export import train as training
from vitrine.export.data import sequences, synthetic
from vitrine.export.data.sequences import OOV, PAD
from vitrine.export.train import TrainConfig, drop_items, load_run, train


@pytest.fixture(scope="module")
def small() -> tuple[sequences.Dataset, dict]:
    table = synthetic.generate(synthetic.preset("small"))
    return sequences.build(table, max_len=8), {"fingerprint": table.fingerprint(), "source": "synthetic:small"}


def test_item_dropout_replaces_only_real_steps_by_the_unknown_item_at_the_given_rate() -> None:
    items = torch.randint(2, 500, (400, 50))
    items[:, :10] = PAD  # left padding
    dropped = drop_items(items, 0.3, torch.Generator().manual_seed(1))
    changed = dropped != items
    assert torch.all(dropped[changed] == OOV)  # a dropped step becomes the unknown item, nothing else
    assert torch.all(dropped[:, :10] == PAD)  # padding stays padding
    assert 0.27 < changed[:, 10:].float().mean().item() < 0.33
    assert torch.equal(drop_items(items, 0.0, torch.Generator().manual_seed(1)), items)
    again = drop_items(items, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(again, dropped)  # seeded: training stays deterministic


def test_item_dropout_is_used_in_training_only_when_asked(small, tmp_path: Path) -> None:
    dataset, info = small
    base = dict(architecture="gru4rec", epochs=1, max_len=8, dim=16, threads=1)
    plain, same, dropped = (load_run(train(TrainConfig(**base, item_dropout=rate), dataset, info, tmp_path / str(i), progress=False))[0]
                            for i, rate in enumerate((0.0, 0.0, 0.5)))
    weights = lambda m: m.state_dict()["cell.weight_ih"]  # noqa: E731
    assert torch.equal(weights(plain), weights(same))
    assert not torch.equal(weights(plain), weights(dropped))


def test_early_stopping_stops_after_patience_epochs_and_keeps_the_best_epochs_weights(small, tmp_path: Path,
                                                                                      monkeypatch) -> None:
    dataset, info = small
    scores = iter([0.10, 0.30, 0.20, 0.25, 0.40, 0.50])  # best after epoch 2, then two epochs without a better one
    seen: list[dict] = []

    def scripted(model, dataset, batch_size=1024):  # noqa: ANN001, ANN202 - stands in for evaluate()
        seen.append(copy.deepcopy(model.state_dict()))
        return {training.STOPPING_METRIC: next(scores)}

    monkeypatch.setattr(training, "evaluate", scripted)
    config = TrainConfig(architecture="gru4rec", epochs=6, patience=2, max_len=8, dim=16, threads=1)
    run_dir = train(config, dataset, info, tmp_path, progress=False)
    record = json.loads((run_dir / "run.json").read_text())
    assert len(record["history"]) == 4 and record["best_epoch"] == 2
    assert [h[f"valid_{training.STOPPING_METRIC}"] for h in record["history"]] == [0.10, 0.30, 0.20, 0.25]
    kept = load_run(run_dir)[0].state_dict()
    for name, value in kept.items():
        assert torch.equal(value, seen[1][name]), name  # epoch 2's weights, not the last epoch's
    assert not torch.equal(kept["cell.weight_ih"], seen[3]["cell.weight_ih"])


def test_without_patience_every_epoch_is_trained_and_validation_is_not_scored(small, tmp_path: Path, monkeypatch) -> None:
    dataset, info = small
    monkeypatch.setattr(training, "evaluate", lambda *a, **k: pytest.fail("scored validation without patience"))
    run_dir = train(TrainConfig(architecture="sasrec", epochs=2, max_len=8, dim=16, threads=1), dataset, info, tmp_path, progress=False)
    record = json.loads((run_dir / "run.json").read_text())
    assert len(record["history"]) == 2 and record["best_epoch"] == 2


def test_bad_lever_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="item_dropout"):
        TrainConfig(architecture="gru4rec", item_dropout=1.0)
    with pytest.raises(ValueError, match="patience"):
        TrainConfig(architecture="gru4rec", patience=-1)


def test_keeping_freed_memory_stops_large_blocks_from_faulting_in_again() -> None:
    """A freed logits-sized block (2,400 × 8,900 floats, 85 MB) is reused instead of unmapped and faulted in
    again (minor page faults counted in a fresh process, after five warm-up blocks: while the heap settles, the
    first few blocks may still land on new pages — with one warm-up block, 4 of the 10 measured blocks once did)."""
    import subprocess
    import sys

    probe = (
        "import resource, sys, torch\n"
        "from vitrine.export.train import keep_freed_memory\n"
        "applied = keep_freed_memory() if sys.argv[1] == 'keep' else None\n"
        "for _ in range(5):\n"
        "    torch.ones(2400, 8900)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(10):\n"
        "    torch.ones(2400, 8900)  # freed at once\n"
        "print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    runs = {mode: subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True).stdout.split()
            for mode in ("keep", "default")}
    if runs["keep"][0] != "True":
        pytest.skip("not glibc: the setting does not apply")
    kept, default = int(runs["keep"][1]), int(runs["default"][1])
    assert default > 10 * 15_000  # by default each block is faulted in again: 20,860 pages of 4 KiB
    assert kept < default / 3, (kept, default)
