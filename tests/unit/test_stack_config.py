"""The stack's rendered configs, without starting anything."""

import configparser
import shlex
import socket

import pytest

from vitrine.services.stack.components import Component, build_all
from vitrine.services.stack.launcher import port_in_use, tail
from vitrine.services.stack.supervisor import Supervisor
from vitrine.settings import Settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    base = Settings()
    return base.model_copy(update={"stack": base.stack.model_copy(update={"home": tmp_path / "stack"})})


def test_components_start_in_dependency_order_with_distinct_ports(settings: Settings) -> None:
    components = build_all(settings)
    assert [c.name for c in components] == [
        "redis", "redis-exporter", "kafka", "mlflow", "triton", "features", "outcomes", "archive", "gateway", "triggers",
        "alertmanager", "prometheus"]
    ports = [port for c in components for _, port in c.ports.values()]
    assert len(ports) == len(set(ports))


def test_supervisor_config_holds_every_component_and_escapes_percent_signs(settings: Settings) -> None:
    components = build_all(settings) + [
        Component(name="odd", command=["echo", "100%"], ports={}, probe=None, url="", env={"X": "5%"})  # type: ignore[arg-type]
    ]
    supervisor = Supervisor(settings.stack.home, settings.stack.stop_timeout_s)
    parser = configparser.ConfigParser()  # interpolating, as supervisord reads it
    parser.read_string(supervisor.render(components))
    for component in components:
        section = parser[f"program:{component.name}"]
        assert shlex.split(section["command"]) == component.command
        assert section["autostart"] == "false"
        assert section["stopasgroup"] == section["killasgroup"] == "true"
        assert section["stdout_logfile"] == str(supervisor.log_file(component.name))
    assert shlex.split(parser["program:odd"]["environment"]) == ["X=5%"]
    priorities = [int(parser[f"program:{c.name}"]["priority"]) for c in components]
    assert priorities == sorted(priorities)


def test_triton_runs_the_cpu_configs_in_explicit_mode_with_the_venv_first_on_path(settings: Settings) -> None:
    triton = next(c for c in build_all(settings) if c.name == "triton")
    assert "--model-config-name=cpu" in triton.command
    assert "--model-control-mode=explicit" in triton.command and "--load-model=*" in triton.command
    assert f"--grpc-port={settings.triton.grpc_port}" in triton.command
    assert triton.env["PATH"].split(":")[0].endswith("/bin")


def test_prepare_renders_kafka_and_prometheus_configs_without_placeholders(settings: Settings, monkeypatch) -> None:
    components = {c.name: c for c in build_all(settings)}
    components["prometheus"].prepare()
    rendered = (settings.stack.home / "prometheus" / "prometheus.yml").read_text()
    assert "${" not in rendered
    assert f"127.0.0.1:{settings.triton.metrics_port}" in rendered
    assert f"127.0.0.1:{settings.redis_exporter.port}" in rendered
    assert "job_name: archive" in rendered and f"127.0.0.1:{settings.archive.metrics_port}" in rendered
    assert "job_name: triggers" in rendered and f"127.0.0.1:{settings.triggers.port}" in rendered


def test_port_in_use_sees_a_listening_socket() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", port)


def test_tail_returns_the_last_lines(tmp_path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail(log, 3) == "line 97\nline 98\nline 99\n"
    assert "no log" in tail(tmp_path / "missing.log", 3)


def test_the_triggers_component_creates_its_token_once_readable_only_by_its_owner(settings: Settings) -> None:
    import stat

    triggers = next(c for c in build_all(settings) if c.name == "triggers")
    assert triggers.command[-2:] == ["triggers", "run"] and triggers.ports == {"http": ("127.0.0.1", settings.triggers.port)}
    token = settings.triggers_token_file
    assert not token.exists()
    triggers.prepare()
    first = token.read_text()
    assert len(first.strip()) >= 32 and stat.S_IMODE(token.stat().st_mode) == 0o600
    triggers.prepare()  # a second `stack up` keeps the token Alertmanager already has
    assert token.read_text() == first
