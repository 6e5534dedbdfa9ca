from typer.testing import CliRunner

from vitrine.cli import app

runner = CliRunner()


def test_invalid_configuration_exits_2_with_the_field_named() -> None:
    result = runner.invoke(app, ["stack", "status"], env={"VITRINE_REDIS__PORT": "not-a-port"})
    assert result.exit_code == 2
    assert "invalid configuration" in result.output and "redis.port" in result.output


def test_logs_of_an_unknown_component_is_a_clear_error() -> None:
    result = runner.invoke(app, ["stack", "logs", "mysql"])
    assert result.exit_code == 1
    assert "unknown component 'mysql'" in result.output and "kafka" in result.output


def test_logs_rejects_a_nonsense_line_count() -> None:
    result = runner.invoke(app, ["stack", "logs", "redis", "-n", "0"])
    assert result.exit_code == 2
