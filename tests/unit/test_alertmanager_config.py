"""The rendered Alertmanager config is valid (amtool) and routes what it should, without starting anything."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from vitrine.services.stack.components import build_all, pipeline_trigger_token_file, pipeline_trigger_url, render_alertmanager_config
from vitrine.settings import Settings

AMTOOL = shutil.which("amtool")
pytestmark = pytest.mark.skipif(AMTOOL is None, reason="amtool comes with prometheus-alertmanager (deploy/setup.sh)")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    base = Settings().shifted(4000)
    return base.model_copy(update={"stack": base.stack.model_copy(update={"home": tmp_path / "stack"})})


@pytest.fixture
def rendered(settings: Settings) -> Path:
    component = next(c for c in build_all(settings) if c.name == "alertmanager")
    component.prepare()
    return settings.stack.home / "alertmanager" / "alertmanager.yml"


def _amtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AMTOOL, *args], capture_output=True, text=True, timeout=30)  # type: ignore[list-item]


def test_amtool_accepts_the_rendered_config(rendered: Path) -> None:
    checked = _amtool("check-config", str(rendered))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout and "${" not in rendered.read_text()


@pytest.mark.parametrize(("labels", "receiver"), [
    (["alertname=VitrineInputDrift", "action=retrain", "severity=ticket"], "pipeline-trigger"),
    (["alertname=VitrineTestRetrain", "action=retrain"], "pipeline-trigger"),
    (["alertname=VitrineGatewayLatencySLO", "severity=page"], "null"),
    (["alertname=VitrineInputDrift", "action=investigate"], "null"),
])
def test_only_retrain_alerts_reach_the_pipeline_trigger(rendered: Path, labels: list[str], receiver: str) -> None:
    routed = _amtool("config", "routes", "test", f"--config.file={rendered}", *labels)
    assert routed.returncode == 0, routed.stderr
    assert routed.stdout.strip() == receiver


def test_the_webhook_points_at_the_trigger_with_a_bearer_token_file(settings: Settings, rendered: Path) -> None:
    config = yaml.safe_load(rendered.read_text())
    webhook = next(r for r in config["receivers"] if r["name"] == "pipeline-trigger")["webhook_configs"][0]
    assert webhook["url"] == f"http://127.0.0.1:{settings.triggers.port}/alerts" == pipeline_trigger_url(settings)
    assert settings.triggers.port == Settings().triggers.port + 4000  # shifted with the stack
    authorization = webhook["http_config"]["authorization"]
    token = pipeline_trigger_token_file(settings)
    assert authorization == {"type": "Bearer", "credentials_file": str(token)}
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) >= 32
    route = config["route"]["routes"][0]
    assert route["group_by"] == ["alertname"]
    assert (route["group_wait"], route["group_interval"], route["repeat_interval"]) == ("30s", "300s", "14400s")


def test_prometheus_sends_alerts_to_the_stacks_alertmanager(settings: Settings) -> None:
    component = next(c for c in build_all(settings) if c.name == "prometheus")
    component.prepare()
    config = yaml.safe_load((settings.stack.home / "prometheus" / "prometheus.yml").read_text())
    targets = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert targets == [f"127.0.0.1:{settings.alertmanager.port}"]
    assert config["rule_files"][1] == str(settings.stack.home / "prometheus" / "rules.d" / "*.yml")
    promtool = shutil.which("promtool")
    if promtool:
        checked = subprocess.run([promtool, "check", "config", "--syntax-only",
                                  str(settings.stack.home / "prometheus" / "prometheus.yml")],
                                 capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr
