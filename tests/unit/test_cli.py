import pytest
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


def test_train_rejects_an_unknown_model() -> None:
    result = runner.invoke(app, ["train", "--model", "bert4rec", "--preset", "tiny"])
    assert result.exit_code == 2 and "unknown model 'bert4rec'" in result.output


@pytest.mark.parametrize(("args", "says"), [
    (["--lr-schedule", "linear"], "choose constant or cosine"),
    (["--warmup", "1"], "--warmup"),
    (["--loss-share", "0"], "--loss-share"),
    (["--adam-beta2", "1"], "--adam-beta2"),
])
def test_train_refuses_bad_training_flags_before_loading_data(args: list[str], says: str) -> None:
    result = runner.invoke(app, ["train", "--preset", "tiny", "--no-registry", *args])
    assert result.exit_code == 2 and says in result.output, result.output


def test_train_rejects_two_data_sources(tmp_path) -> None:
    events = tmp_path / "e.jsonl"
    events.write_text("")
    result = runner.invoke(app, ["train", "--preset", "tiny", "--events", str(events)])
    assert result.exit_code == 2 and "choose one data source" in result.output


def test_train_names_the_bad_line_of_an_events_file(tmp_path) -> None:
    events = tmp_path / "e.jsonl"
    events.write_text('{"event_id": "a", "user_id": "u", "item_id": "i", "type": "view", "ts_ms": 1767225600000}\n{"oops": 1}\n')
    result = runner.invoke(app, ["train", "--events", str(events)])
    assert result.exit_code == 2 and "e.jsonl:2" in result.output


def test_events_generate_writes_valid_events_that_train_reads_back(tmp_path) -> None:
    out = tmp_path / "tiny.jsonl"
    result = runner.invoke(app, ["events", "generate", "--preset", "tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    from vitrine.export.data.synthetic import generate, preset
    from vitrine.export.data.table import EventTable

    assert EventTable.read_jsonl(out).fingerprint() == generate(preset("tiny")).fingerprint()


def test_export_without_runs_is_a_clear_error(tmp_path) -> None:
    result = runner.invoke(app, ["export", "--runs-dir", str(tmp_path), "--no-load"])
    assert result.exit_code == 1 and "run `vitrine train` first" in result.output


def test_export_rejects_a_bad_model_name(tmp_path) -> None:
    result = runner.invoke(app, ["export", "--name", "../etc", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2 and "lower-case" in result.output


def test_replay_names_the_bad_line(tmp_path) -> None:
    events = tmp_path / "e.jsonl"
    events.write_text('{"event_id": "a", "user_id": "u", "item_id": "i", "type": "teleport", "ts_ms": 1767225600000}\n')
    result = runner.invoke(app, ["events", "replay", str(events)])
    assert result.exit_code == 2 and "e.jsonl:1" in result.output


def test_generate_rejects_a_zero_rate() -> None:
    result = runner.invoke(app, ["events", "generate", "--rate", "0"])
    assert result.exit_code == 2 and "--rate" in result.output


def test_publishing_without_kafka_fails_with_one_clear_line() -> None:
    result = runner.invoke(app, ["events", "generate", "--preset", "tiny", "--count", "5"],
                           env={"VITRINE_KAFKA__PORT": "1"})
    assert result.exit_code == 1 and "is the stack up?" in result.output


def test_bench_gateway_rejects_bad_rates() -> None:
    result = runner.invoke(app, ["bench", "gateway", "--rates", "10,fast"])
    assert result.exit_code == 2 and "comma-separated" in result.output
    result = runner.invoke(app, ["bench", "gateway", "--rates", "0"])
    assert result.exit_code == 2 and "(0, 100000]" in result.output
    result = runner.invoke(app, ["bench", "gateway", "--start-rate", "200", "--max-rate", "100"])
    assert result.exit_code == 2 and "--max-rate" in result.output and "at least --start-rate" in result.output
    result = runner.invoke(app, ["bench", "gateway", "--repeats", "0"])
    assert result.exit_code == 2 and "--repeats" in result.output


def test_loadtest_rejects_unknown_arrivals() -> None:
    result = runner.invoke(app, ["loadtest", "--arrivals", "bursty"])
    assert result.exit_code == 2 and "constant or poisson" in result.output


def test_ab_set_rejects_a_malformed_variant() -> None:
    result = runner.invoke(app, ["ab", "set", "-v", "control:gru4rec:70"])
    assert result.exit_code == 2 and "NAME=MODEL[:VERSION]=WEIGHT" in result.output


def test_ab_set_rejects_weights_that_do_not_sum_to_100() -> None:
    result = runner.invoke(app, ["ab", "set", "-v", "a=gru4rec=60", "-v", "b=sasrec=30"])
    assert result.exit_code == 2 and "sum to 90" in result.output


def test_recommend_without_a_gateway_fails_with_one_clear_line() -> None:
    result = runner.invoke(app, ["recommend", "u1", "--key", "k"], env={"VITRINE_GATEWAY__PORT": "1"})
    assert result.exit_code == 1 and "UNAVAILABLE" in result.output


def test_a_raw_api_key_pasted_as_a_hash_is_refused_without_being_echoed() -> None:
    secret = "sk-live-do-not-print-me-0123456789"
    result = runner.invoke(app, ["stack", "status"],
                           env={"VITRINE_GATEWAY__API_KEYS": f'{{"{secret}": {{"name": "shop", "role": "storefront"}}}}'})
    assert result.exit_code == 2 and "gateway.api_keys" in result.output and "sha256" in result.output
    assert secret not in result.output and secret[:12] not in result.output


def test_ab_set_refuses_an_unknown_mode_and_an_interleaving_of_three() -> None:
    result = runner.invoke(app, ["ab", "set", "-v", "a=gru4rec=100", "--mode", "shuffle"])
    assert result.exit_code == 2 and "ab or interleave" in result.output
    result = runner.invoke(app, ["ab", "set", "-v", "a=gru4rec=40", "-v", "b=sasrec=30", "-v", "c=popularity=30", "--mode", "interleave"])
    assert result.exit_code == 2 and "exactly two" in result.output


@pytest.mark.parametrize("args", [
    ["train", "--preset", "tiny", "--loss", "hinge"],
    ["train", "--preset", "tiny", "--negatives", "0"],
    ["train", "--preset", "tiny", "--threads", "0"],
    ["bench", "stats", "--aa-experiments", "5"],
    ["ab", "report", "--revision", "0"],
])
def test_new_flags_refuse_values_out_of_their_bounds(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output


def test_the_gateway_refuses_an_experiment_mode_it_does_not_know() -> None:
    from pydantic import ValidationError

    from vitrine.services.gateway.admin import from_proto
    from vitrine.v1 import recommender_pb2 as pb

    with pytest.raises(ValidationError, match="mode"):
        from_proto(pb.Experiment(salt="s", mode="shuffle", variants=[pb.Variant(name="a", model_name="gru4rec", weight=100)]))


def _tie_with_transitions(tmp_path):  # noqa: ANN001, ANN202 - a run folder whose model ties the strongest baseline
    import json

    run = tmp_path / "run-tie"
    run.mkdir()
    metrics = {"recall@10": 0.63, "recall@20": 0.68, "ndcg@10": 0.47, "mrr": 0.43}
    run.joinpath("run.json").write_text(json.dumps({
        "model": "gru4rec", "data": {"fingerprint": "made-up", "cutoff_ms": 1}, "metrics": {"model": metrics},
        "baselines": {"metrics": {"transitions": metrics}}}))
    return run


def test_export_takes_the_gate_thresholds_from_settings_and_flags_override_them(tmp_path) -> None:
    run = _tie_with_transitions(tmp_path)
    rejected = runner.invoke(app, ["export", str(run), "--no-load", "--no-registry"])
    assert rejected.exit_code == 1 and "gate REJECTED" in rejected.output and "margin 2%" in rejected.output
    by_env = runner.invoke(app, ["export", str(run), "--no-load", "--no-registry"], env={"VITRINE_GATE__MARGIN": "0"})
    assert "gate accepted" in by_env.output and "margin 0%" in by_env.output  # then the export itself fails: no model.pt
    by_flag = runner.invoke(app, ["export", str(run), "--no-load", "--no-registry", "--margin", "0"], env={"VITRINE_GATE__MARGIN": "0.5"})
    assert "gate accepted" in by_flag.output


def test_export_refuses_out_of_bound_gate_flags(tmp_path) -> None:
    assert runner.invoke(app, ["export", "--runs-dir", str(tmp_path), "--margin", "1.5"]).exit_code == 2
    result = runner.invoke(app, ["export", "--runs-dir", str(tmp_path), "--gate-metric", "auc"])
    assert result.exit_code == 2 and "metric" in result.output


@pytest.mark.parametrize(("args", "says"), [
    (["pipeline", "run", "--trigger", "cron"], "is not one of manual, schedule, drift"),
    (["pipeline", "run", "--window-days", "0"], "--window-days"),
    (["pipeline", "run", "--until", "2026-13-01"], "--until"),
    (["pipeline", "run", "--run-id", "../../etc"], "is not a run id"),
    (["pipeline", "resume", "latest"], "is not a run id"),
    (["pipeline", "reproduce", "x/y"], "is not a run id"),
    (["pipeline", "run", "--cause", "two\nlines"], "printable characters"),
    (["pipeline", "run", "--cause", "x" * 2001], "printable characters"),
])
def test_pipeline_refuses_bad_flags_with_exit_2(args: list[str], says: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and says in result.output, result.output


def test_pipeline_settings_out_of_bounds_are_named() -> None:
    result = runner.invoke(app, ["pipeline", "list"], env={"VITRINE_PIPELINE__WINDOW_DAYS": "0"})
    assert result.exit_code == 2 and "pipeline.window_days" in result.output
    result = runner.invoke(app, ["pipeline", "list"], env={"VITRINE_TRIGGERS__SCHEDULE_INTERVAL_S": "5"})
    assert result.exit_code == 2 and "triggers.schedule_interval_s" in result.output


def test_pipeline_status_without_runs_is_a_clear_error(tmp_path) -> None:
    result = runner.invoke(app, ["pipeline", "status"], env={"VITRINE_STACK__HOME": str(tmp_path)})
    assert result.exit_code == 1 and "no pipeline runs yet" in result.output


def test_pipeline_list_and_status_show_a_crashed_run_as_crashed(tmp_path) -> None:
    from vitrine.export.pipeline.record import FileRunRecorder, new_run_id

    recorder = FileRunRecorder(tmp_path / "pipeline")
    done, crashed = new_run_id(), new_run_id()
    recorder.start(done, "manual", {"window": {"since": "2026-11-01", "until": "2026-11-30"}})
    recorder.finish(done, "rejected", "no candidate passed the gate")
    recorder.start(crashed, "drift", {"window": {"since": "2026-11-02", "until": "2026-12-01"}})  # nobody holds the lock
    env = {"VITRINE_STACK__HOME": str(tmp_path)}
    listed = runner.invoke(app, ["pipeline", "list"], env=env)
    assert listed.exit_code == 0
    assert f"{done}  manual    rejected" in listed.output and f"{crashed}  drift     crashed" in listed.output
    status = runner.invoke(app, ["pipeline", "status", crashed], env=env)
    assert status.exit_code == 0 and "crashed" in status.output and "validate" in status.output


def test_train_defaults_are_the_training_config_defaults() -> None:
    """`vitrine train` repeats TrainConfig's defaults as literals (so that the CLI need not import torch)."""
    import inspect

    from vitrine.cli import train_command
    from vitrine.export.train import TrainConfig
    from vitrine.settings import PipelineSettings

    params = inspect.signature(train_command).parameters
    defaults = TrainConfig("gru4rec")
    for name in ("max_len", "lr_schedule", "warmup"):
        assert params[name].default == getattr(defaults, name) == getattr(PipelineSettings(), name), name
    for name in ("dim", "epochs", "batch_size", "learning_rate"):  # None: per architecture, resolved by TrainConfig
        assert params[name].default is None and getattr(PipelineSettings(), name) is None, name
        assert TrainConfig.__dataclass_fields__[name].default is None, name
    assert params["dropout"].default is None and TrainConfig.__dataclass_fields__["dropout"].default is None
    for name in ("tied", "item_dropout", "weight_decay", "patience", "loss", "negatives", "sampling_alpha",
                 "loss_share", "adam_beta2"):
        assert params[name].default == getattr(defaults, name), name
