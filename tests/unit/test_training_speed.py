"""Training-speed levers of issue 14.4: a learning-rate schedule (warm-up, cosine decay) and a loss on a share of
the positions."""

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from vitrine.export import train as training
from vitrine.export.data import sequences, synthetic
from vitrine.export.train import TrainConfig, load_run, lr_factor, train


@pytest.fixture(scope="module")
def small() -> tuple[sequences.Dataset, dict]:
    table = synthetic.generate(synthetic.preset("small"))
    return sequences.build(table, max_len=8), {"fingerprint": table.fingerprint(), "source": "synthetic:small"}


def test_the_learning_rate_factor_at_given_steps() -> None:
    # 100 steps, 10 of warm-up: linear up to 1 at step 9, then half a cosine down to 0 after step 99.
    assert [lr_factor(s, 100, "cosine", 0.1) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, 100, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, "cosine", 0.1) == pytest.approx(0.5)  # halfway through the 90 decay steps
    assert lr_factor(25, 100, "cosine", 0.1) == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 90)))
    assert lr_factor(99, 100, "cosine", 0.1) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert 0 < lr_factor(99, 100, "cosine", 0.1) < 0.001
    factors = [lr_factor(s, 100, "cosine", 0.1) for s in range(100)]
    assert all(a > b for a, b in zip(factors[10:], factors[11:], strict=False))  # strictly decreasing after warm-up
    # constant: the same warm-up, then the full rate; without warm-up exactly 1 everywhere (the old behaviour)
    assert [lr_factor(s, 100, "constant", 0.1) for s in (0, 9, 10, 99)] == pytest.approx([0.1, 1.0, 1.0, 1.0])
    assert all(lr_factor(s, 100, "constant", 0.0) == 1.0 for s in range(100))
    assert lr_factor(0, 100, "cosine", 0.0) == 1.0  # no warm-up: the decay starts at the full rate


def test_training_follows_the_schedule_step_by_step(small, tmp_path: Path) -> None:
    dataset, info = small
    config = TrainConfig(architecture="gru4rec", epochs=3, max_len=8, dim=16, threads=1, learning_rate=0.01,
                         lr_schedule="cosine", warmup=0.2)
    record = json.loads((train(config, dataset, info, tmp_path, progress=False) / "run.json").read_text())
    batches = math.ceil(len(dataset.train_inputs) / config.batch_size)
    total = 3 * batches
    for epoch, row in enumerate(record["history"], start=1):  # the rate of each epoch's last step
        assert row["last_lr"] == pytest.approx(0.01 * lr_factor(epoch * batches - 1, total, "cosine", 0.2)), epoch
    assert record["history"][-1]["last_lr"] < 0.01 * 0.01  # decayed to ~0 by the last step


def test_without_a_schedule_the_rate_is_the_configured_one_throughout(small, tmp_path: Path) -> None:
    dataset, info = small
    config = TrainConfig(architecture="sasrec", epochs=2, max_len=8, dim=16, threads=1, learning_rate=0.004,
                         lr_schedule="constant", warmup=0.0)
    record = json.loads((train(config, dataset, info, tmp_path, progress=False) / "run.json").read_text())
    assert [row["last_lr"] for row in record["history"]] == [0.004, 0.004]


def test_the_loss_scores_the_configured_share_of_real_positions(small, tmp_path: Path, monkeypatch) -> None:
    dataset, info = small
    scored: list[int] = []
    real_loss = training.full_softmax_loss

    def counting(hidden, targets, table):  # noqa: ANN001, ANN202 - wraps the real loss
        scored.append(len(targets))
        return real_loss(hidden, targets, table)

    monkeypatch.setattr(training, "full_softmax_loss", counting)
    real = int((dataset.train_targets != 0).sum())
    base = dict(architecture="gru4rec", epochs=1, max_len=8, dim=16, threads=1)
    train(TrainConfig(**base), dataset, info, tmp_path / "all", progress=False)
    assert sum(scored) == real
    scored.clear()
    half = load_run(train(TrainConfig(**base, loss_share=0.5), dataset, info, tmp_path / "half", progress=False))[0]
    assert 0.45 * real < sum(scored) < 0.55 * real
    again = load_run(train(TrainConfig(**base, loss_share=0.5), dataset, info, tmp_path / "again", progress=False))[0]
    for name, value in half.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name  # seeded: still deterministic


def test_adams_second_moment_decay_reaches_the_optimizer(small, tmp_path: Path, monkeypatch) -> None:
    dataset, info = small
    made: list[tuple[float, float]] = []
    real_adam = torch.optim.Adam

    def recording(params, **kwargs):  # noqa: ANN001, ANN003, ANN202 - wraps torch's Adam
        made.append(kwargs["betas"])
        return real_adam(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", recording)
    base = dict(architecture="gru4rec", epochs=1, max_len=8, dim=16, threads=1)
    default = load_run(train(TrainConfig(**base), dataset, info, tmp_path / "a", progress=False))[0]
    faster = load_run(train(TrainConfig(**base, adam_beta2=0.98), dataset, info, tmp_path / "b", progress=False))[0]
    assert made == [(0.9, 0.999), (0.9, 0.98)]
    assert not torch.equal(default.state_dict()["cell.weight_ih"], faster.state_dict()["cell.weight_ih"])


def test_bad_schedule_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(architecture="gru4rec", lr_schedule="step")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(architecture="gru4rec", warmup=1.0)
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(architecture="gru4rec", warmup=-0.1)
    with pytest.raises(ValueError, match="adam_beta2"):
        TrainConfig(architecture="gru4rec", adam_beta2=1.0)
    with pytest.raises(ValueError, match="dropout"):
        TrainConfig(architecture="sasrec", dropout=1.0)
    with pytest.raises(ValueError, match="loss_share"):
        TrainConfig(architecture="gru4rec", loss_share=0.0)
    with pytest.raises(ValueError, match="loss_share"):
        TrainConfig(architecture="gru4rec", loss_share=1.5)


def test_the_pipeline_records_the_schedule_and_reproduces_older_records_at_a_constant_rate() -> None:
    from vitrine.export.pipeline.training import train_config, training_params
    from vitrine.settings import PipelineSettings

    settings = PipelineSettings(lr_schedule="cosine", warmup=0.05)
    params = training_params(settings)
    assert params["lr_schedule"] == "cosine" and params["warmup"] == 0.05
    config = train_config("sasrec", params)
    assert config.lr_schedule == "cosine" and config.warmup == 0.05
    assert config.dropout == training.DEFAULTS["sasrec"]["dropout"] and config.epochs == training.DEFAULTS["sasrec"]["epochs"]
    older = {"models": ["sasrec"], "epochs": 20, "batch_size": 128, "learning_rate": 3e-3, "dim": None, "max_len": 20,
             "validation_fraction": 0.1, "seed": 7, "threads": 2}  # a record from before 14.4
    config = train_config("sasrec", older)
    assert (config.lr_schedule, config.warmup, config.dropout, config.tied) == ("constant", 0.0, 0.2, True)
    assert train_config("sasrec", params).tied is False
    assert (config.epochs, config.batch_size, config.learning_rate) == (20, 128, 3e-3)


@pytest.mark.parametrize("architecture", ["gru4rec", "sasrec"])
def test_fields_left_unset_take_the_architectures_defaults_and_set_ones_are_kept(architecture: str) -> None:
    config = TrainConfig(architecture=architecture)
    for name, value in training.DEFAULTS[architecture].items():
        assert getattr(config, name) == value, name
    assert (config.lr_schedule, config.warmup, config.tied) == ("cosine", 0.05, False)
    chosen = TrainConfig(architecture=architecture, epochs=3, batch_size=16, learning_rate=0.02, dropout=0.3)
    assert (chosen.epochs, chosen.batch_size, chosen.learning_rate, chosen.dropout) == (3, 16, 0.02, 0.3)
    assert TrainConfig(**{k: v for k, v in asdict(config).items()}) == config  # a record rebuilds the same config
