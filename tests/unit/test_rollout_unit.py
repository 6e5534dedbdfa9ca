"""Rollouts without a stack: the CLI's validation of MODEL[:VERSION], steps and holds, the settings' bounds, the
state's rules, and the split a step sets (users sticky: only the last variant's range grows)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from vitrine.cli import app
from vitrine.services.gateway.experiment import BUCKETS, Experiment, Variant
from vitrine.services.rollouts.controller import split
from vitrine.services.rollouts.store import ABORTED, RolloutState
from vitrine.settings import RolloutSettings, Settings

runner = CliRunner()
# An unreachable Redis and Triton: a command that got past validation fails with its own message, never hangs.
OFFLINE = {"VITRINE_REDIS__PORT": "1", "VITRINE_TRITON__HTTP_PORT": "1"}


@pytest.mark.parametrize(("args", "says"), [
    (["Sasrec"], "is not MODEL[:VERSION]"),
    (["sasrec:v2"], "is not MODEL[:VERSION]"),
    (["sasrec:"], "is not MODEL[:VERSION]"),
    (["sasrec", "--steps", "1,5,x"], "comma-separated whole percentages"),
    (["sasrec", "--steps", "5,1,100"], "must increase strictly"),
    (["sasrec", "--steps", "1,5,5,100"], "must increase strictly"),
    (["sasrec", "--steps", "0,50,100"], "percentages in 1..100"),
    (["sasrec", "--steps", "10,150"], "percentages in 1..100"),
    (["sasrec", "--steps", "1,5,50"], "the last step must be 100"),
    (["sasrec", "--hold", "10 minutes"], "is not a duration"),
    (["sasrec", "--hold", "0.5s"], "between 1 s and 7 days"),
    (["sasrec", "--hold", "8d"], "is not a duration"),
    (["sasrec", "--hold", "200h"], "between 1 s and 7 days"),
])
def test_start_refuses_a_bad_target_steps_or_hold_with_exit_2(args: list[str], says: str) -> None:
    result = runner.invoke(app, ["rollout", "start", *args], env=OFFLINE)
    assert result.exit_code == 2 and says in result.output, result.output


def test_start_with_valid_arguments_goes_on_to_ask_triton() -> None:
    result = runner.invoke(app, ["rollout", "start", "sasrec:3", "--steps", "10,100", "--hold", "1.5m"], env=OFFLINE)
    assert result.exit_code == 1 and "cannot ask Triton" in result.output and "sasrec:3" in result.output, result.output


def test_status_without_redis_is_a_clear_error() -> None:
    result = runner.invoke(app, ["rollout", "status"], env=OFFLINE)
    assert result.exit_code == 1 and "cannot reach Redis" in result.output, result.output


def test_settings_defaults_and_bounds() -> None:
    cfg = RolloutSettings()
    assert cfg.steps == (1, 5, 25, 50, 100) and cfg.p99_ratio >= 1
    assert RolloutSettings(steps="10,50,100").steps == (10, 50, 100)  # env / TOML may give text
    for bad in ({"steps": (5, 1, 100)}, {"steps": (1, 50)}, {"steps": ()}, {"hold_s": 0}, {"p99_ratio": 0.9}, {"error_ratio_slack": 2},
                {"variant": "Challenger!"}, {"min_requests": 0}):
        with pytest.raises(ValidationError):
            RolloutSettings(**bad)


def test_settings_from_the_environment_are_validated_with_the_field_named() -> None:
    result = runner.invoke(app, ["rollout", "status"], env={"VITRINE_ROLLOUTS__STEPS": "[50, 10, 100]"})
    assert result.exit_code == 2 and "rollouts.steps" in result.output, result.output
    assert Settings().rollouts.metrics_port + 1000 == Settings().shifted(1000).rollouts.metrics_port


def _state(**update: object) -> RolloutState:
    base = {"model": "sasrec", "control": "control", "steps": (1, 5, 25, 50, 100), "hold_s": 5, "step_started_ms": 0,
            "experiment_revision": 3}
    return RolloutState(**{**base, **update})


def test_the_state_refuses_bad_steps_and_reports_zero_percent_once_ended() -> None:
    with pytest.raises(ValidationError, match="last step must be 100"):
        _state(steps=(1, 5))
    assert _state(step=2).percent == 25 and _state(step=2, status=ABORTED).percent == 0
    assert _state(version="4").target == "sasrec:4"


def test_growing_the_last_variant_keeps_every_user_who_saw_the_challenger() -> None:
    experiment = Experiment(salt="s", variants=(Variant(name="control", model_name="gru4rec", weight=99),
                                                Variant(name="challenger", model_name="sasrec", weight=1)))
    state = _state()
    users = [f"u{n}" for n in range(BUCKETS)]
    seen: set[str] = set()
    for percent in state.steps:
        current = split(experiment, state, percent)
        assert {v.name: v.weight for v in current.variants} == {"control": 100 - percent, "challenger": percent}
        now = {u for u in users if current.assign(u).name == "challenger"}
        assert seen <= now, f"{len(seen - now)} users lost the challenger at {percent} %"
        assert abs(len(now) / len(users) - percent / 100) < 0.02
        seen = now
    assert {v.weight for v in split(experiment, state, 0).variants if v.name == "challenger"} == {0}


def test_a_stored_state_that_is_not_a_rollout_is_refused_with_the_key_and_the_field_named() -> None:
    from vitrine.services.rollouts.store import InvalidState, RolloutStore

    store = RolloutStore(None, "vt")  # type: ignore[arg-type] - parsing only, no Redis call
    good = _state().model_dump_json().encode()
    assert store._parse(good) == _state() and store._parse(None) is None
    for bad, field in ((good.replace(b'"running"', b'"sleeping"'), "status"), (good.replace(b"[1,5,25,50,100]", b"[1,5,50]"), "steps"),
                       (b"not json", "state")):
        with pytest.raises(InvalidState, match=rf"vt:rollout\) is invalid \({field}") as caught:
            store._parse(bad)
        assert "delete the key" in str(caught.value)


def test_promtool_finds_nothing_to_say_about_the_controllers_metrics() -> None:
    import shutil
    import subprocess

    from prometheus_client import CollectorRegistry, generate_latest

    from vitrine.services.rollouts.metrics import RolloutMetrics

    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (make setup installs it)")
    registry = CollectorRegistry()
    metrics = RolloutMetrics(registry)
    metrics.show("sasrec", 25, "running")
    metrics.decisions.labels("advance").inc()
    metrics.last_tick.set(1.7e9)
    checked = subprocess.run(["promtool", "check", "metrics"], input=generate_latest(registry).decode(), capture_output=True, text=True)
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), checked.stdout + checked.stderr


def test_a_split_keeps_a_variant_a_person_added_and_refuses_weights_that_cannot_add_up() -> None:
    from vitrine.services.rollouts.controller import RolloutError

    experiment = Experiment(salt="s", variants=(Variant(name="control", model_name="gru4rec", weight=60),
                                                Variant(name="extra", model_name="sasrec", weight=30),
                                                Variant(name="challenger", model_name="sasrec", weight=10)))
    assert {v.name: v.weight for v in split(experiment, _state(), 25).variants} == {"control": 45, "extra": 30, "challenger": 25}
    with pytest.raises(RolloutError, match="other variants hold 30 %"):
        split(experiment, _state(), 75)
    with pytest.raises(RolloutError, match="no variant 'gone' "):
        split(experiment, _state(control="gone"), 5)


def test_the_rollback_alert_fires_on_a_rollback_and_not_on_advances(tmp_path) -> None:  # noqa: ANN001
    """promtool evaluates deploy/prometheus/alerts.yml over planted controller counters: one rollback at minute 5 fires
    VitrineRolloutRolledBack at once (no `for:`), and resolves 15 minutes later; advances and holds never fire it."""
    import shutil
    import subprocess

    import yaml

    from vitrine.services.rollouts.metrics import DECISIONS
    from vitrine.services.stack.components import ALERT_RULES

    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (make setup installs it)")
    series = {f'{DECISIONS}{{action="rollback",instance="c",job="rollouts"}}': "0x4 1x30",
              f'{DECISIONS}{{action="advance",instance="c",job="rollouts"}}': "0+1x34",
              f'{DECISIONS}{{action="hold",instance="c",job="rollouts"}}': "0+7x34"}
    fired = [{"labels": 'ALERTS{alertname="VitrineRolloutRolledBack",alertstate="firing",severity="ticket"}', "value": 1}]

    def at(minute: int, samples: list) -> dict:
        return {"expr": 'ALERTS{alertname="VitrineRolloutRolledBack"}', "eval_time": f"{minute}m", "exp_samples": samples}

    spec = tmp_path / "rollout_alert_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(ALERT_RULES)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": [{"series": k, "values": v} for k, v in series.items()],
        "promql_expr_test": [at(4, []), at(6, fired), at(18, fired), at(22, [])]}]}))
    result = subprocess.run(["promtool", "test", "rules", str(spec)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_rollout_starts_with_control_first_and_the_challenger_last_at_the_first_step() -> None:
    from vitrine.services.rollouts.controller import first_step

    current = Experiment(salt="s", revision=7, variants=(Variant(name="control", model_name="gru4rec", weight=50),
                                                         Variant(name="treatment", model_name="sasrec", weight=50)))
    started = first_step(current, _state(version="2", steps=(5, 100)))
    assert [(v.name, v.model_name, v.model_version, v.weight) for v in started.variants] == [
        ("control", "gru4rec", "", 95), ("challenger", "sasrec", "2", 5)]
    assert started.salt == current.salt and started.name == current.name  # same users in the same buckets
