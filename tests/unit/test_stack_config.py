"""The stack's rendered configs, without starting anything."""

import configparser
import shlex
import shutil
import socket
import subprocess

import pytest
import yaml

from vitrine.services.stack.components import ALERT_RULES, DRIFT_ALERT, Component, build_all, render_alert_rules
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
        "redis", "redis-exporter", "kafka", "mlflow", "triton", "features", "outcomes", "archive", "gateway", "rollouts",
        "triggers", "alertmanager", "prometheus"]
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
    assert "job_name: rollouts" in rendered and f"127.0.0.1:{settings.rollouts.metrics_port}" in rendered


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


def _for_by_alert(text: str) -> dict[str, str]:
    return {r["alert"]: r.get("for") for g in yaml.safe_load(text)["groups"] for r in g["rules"] if "alert" in r}


def test_the_stack_loads_the_alert_rules_with_the_settings_durations(settings: Settings) -> None:
    source = _for_by_alert(ALERT_RULES.read_text())
    assert _for_by_alert(render_alert_rules(settings)) == source
    short = settings.model_copy(update={"prometheus": settings.prometheus.model_copy(update={"alert_for": {DRIFT_ALERT: "15s"}})})
    components = {c.name: c for c in build_all(short)}
    components["prometheus"].prepare()
    rendered = short.stack.home / "prometheus" / "alerts.yml"
    assert _for_by_alert(rendered.read_text()) == {**source, DRIFT_ALERT: "15s"}
    assert f"- {rendered}" in (short.stack.home / "prometheus" / "prometheus.yml").read_text()
    if shutil.which("promtool"):
        checked = subprocess.run(["promtool", "check", "rules", str(rendered)], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_an_alert_duration_for_an_unknown_alert_is_refused(settings: Settings) -> None:
    wrong = settings.model_copy(update={"prometheus": settings.prometheus.model_copy(update={"alert_for": {"VitrineInputDrfit": "15s"}})})
    with pytest.raises(ValueError, match="VitrineInputDrfit"):
        render_alert_rules(wrong)
    with pytest.raises(ValueError):
        Settings(prometheus={"alert_for": {DRIFT_ALERT: "soon"}})
