from pathlib import Path

import pytest
from pydantic import ValidationError

from vitrine.settings import CONFIG_FILE_ENV, Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("VITRINE_") and name != "VITRINE_CACHE":
            monkeypatch.delenv(name)


def test_defaults_stay_off_the_standard_ports() -> None:
    settings = Settings()
    ports = {settings.redis.port, settings.kafka.port, settings.triton.http_port, settings.triton.grpc_port,
             settings.triton.metrics_port, settings.prometheus.port, settings.redis_exporter.port}
    assert ports.isdisjoint({6379, 9092, 8000, 8001, 8002, 9090, 9121})
    assert len(ports) == 7


def test_env_with_prefix_and_nesting_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITRINE_REDIS__PORT", "6390")
    monkeypatch.setenv("VITRINE_KAFKA__PARTITIONS", "8")
    settings = Settings()
    assert settings.redis.port == 6390 and settings.redis.url == "redis://127.0.0.1:6390/0"
    assert settings.kafka.partitions == 8


def test_toml_file_overrides_defaults_and_env_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "vitrine.toml"
    config.write_text("[redis]\nport = 7000\n\n[kafka]\npartitions = 2\n")
    monkeypatch.setenv(CONFIG_FILE_ENV, str(config))
    monkeypatch.setenv("VITRINE_KAFKA__PARTITIONS", "6")
    settings = Settings()
    assert settings.redis.port == 7000
    assert settings.kafka.partitions == 6


@pytest.mark.parametrize(
    ("env", "value", "message"),
    [
        ("VITRINE_REDIS__PORT", "70000", "less than or equal to 65535"),
        ("VITRINE_REDIS__PORT", "six", "valid integer"),
        ("VITRINE_KAFKA__HEAP", "lots", "should match pattern"),
        ("VITRINE_TRITON__MODEL_CONTROL_MODE", "magic", "explicit"),
        ("VITRINE_KAFKA__PARTITIONS", "0", "greater than or equal to 1"),
    ],
)
def test_bad_values_are_rejected_with_the_field_named(monkeypatch: pytest.MonkeyPatch, env: str, value: str, message: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError, match=message) as error:
        Settings()
    section, field = env.removeprefix("VITRINE_").lower().split("__")
    assert f"{section}.{field}" in str(error.value)


def test_unknown_key_in_the_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "vitrine.toml"
    config.write_text("[redis]\nprot = 7000\n")
    monkeypatch.setenv(CONFIG_FILE_ENV, str(config))
    with pytest.raises(ValidationError, match="prot"):
        Settings()


def test_a_missing_config_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_FILE_ENV, str(tmp_path / "nope.toml"))
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        Settings()


def test_shifted_moves_every_port_and_the_stack_folder() -> None:
    base = Settings()
    moved = base.shifted(1000)
    assert moved.redis.port == base.redis.port + 1000
    assert moved.kafka.controller_port == base.kafka.controller_port + 1000
    assert moved.triton.metrics_port == base.triton.metrics_port + 1000
    assert moved.redis_exporter.port == base.redis_exporter.port + 1000
    assert moved.stack.home != base.stack.home and moved.stack.home.parent == base.stack.home.parent
    with pytest.raises(ValueError, match="out of 1..65535"):
        base.shifted(60000)


def test_pipeline_runs_read_the_consumers_archive_unless_told_otherwise(tmp_path) -> None:
    base = Settings(stack={"home": tmp_path / "stack"})
    assert base.pipeline_archive_root == base.archive_root == (tmp_path / "stack" / "archive").resolve()
    copy = Settings(stack={"home": tmp_path / "stack"}, pipeline={"archive_root": tmp_path / "replica"})
    assert copy.pipeline_archive_root == (tmp_path / "replica").resolve() and copy.archive_root == base.archive_root
