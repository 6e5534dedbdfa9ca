"""What the local stack runs: one `Component` per server, in start order, built from the settings.

Each component says how to start it (a command for supervisord), which ports it needs, how to prepare
its state once (configs, Kafka's storage format) and how to tell that it is ready to use.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import sysconfig
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from string import Template

import yaml
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic

from vitrine.contracts import topics
from vitrine.export.validate import validate_repository
from vitrine.services.stack import health
from vitrine.settings import REPO_ROOT, Settings

Probe = Callable[[Settings], Awaitable[str | None]]
ALERT_RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTMANAGER_CONFIG = REPO_ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
DRIFT_ALERT = "VitrineInputDrift"
"""The alert (in ALERT_RULES) that asks for a retrain when a model's inputs drift from its baseline."""
EXTRA_RULES_DIR = "rules.d"
"""Under the stack's prometheus/ folder: more rule files (`*.yml`) Prometheus loads beside ALERT_RULES after a
reload. Empty on a normal stack; tests plant short-lived rules there (e.g. one that fires at once)."""
MLFLOW_WORKER_TIMEOUT_S = 60
"""Uvicorn worker timeout of the MLflow server: above its slowest call here (a model.pt upload of a few MB)."""


class SetupMissing(RuntimeError):
    """A binary or download that deploy/setup.sh provides is not there."""


@dataclass(frozen=True)
class Component:
    name: str
    command: list[str]
    ports: dict[str, tuple[str, int]]
    probe: Probe
    url: str
    env: dict[str, str] = field(default_factory=dict)
    prepare: Callable[[], None] | None = None
    after_ready: Callable[[], Awaitable[None]] | None = None


def _template(name: str) -> Template:
    return Template(files("vitrine.services.stack").joinpath("templates", name).read_text())


def _write_if_changed(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != content:
        path.write_text(content)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise SetupMissing(f"{what} not found at {path}; run deploy/setup.sh (make setup) first")
    return path


def _binary(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise SetupMissing(f"`{name}` is not on PATH; run deploy/setup.sh (make setup) first")
    return found


def redis(settings: Settings) -> Component:
    cfg, data = settings.redis, settings.stack.home / "redis"

    def prepare() -> None:
        data.mkdir(parents=True, exist_ok=True)

    return Component(
        name="redis",
        command=[
            _binary("redis-server"),
            "--bind", cfg.host,
            "--port", str(cfg.port),
            "--dir", str(data),
            "--daemonize", "no",
            "--appendonly", "yes",
            "--appendfsync", cfg.appendfsync,
            "--save", "",
            "--maxmemory", f"{cfg.maxmemory_mb}mb",
            "--maxmemory-policy", "noeviction",  # exactly-once state must never be evicted (services/member.py, eviction_risk)
        ],
        ports={"redis": (cfg.host, cfg.port)},
        probe=health.redis_ready,
        url=cfg.url,
        prepare=prepare,
    )


def redis_exporter(settings: Settings) -> Component:
    cfg = settings.redis_exporter
    return Component(
        name="redis-exporter",
        command=[
            _binary("prometheus-redis-exporter"),
            f"-redis.addr=redis://{settings.redis.host}:{settings.redis.port}",
            f"-web.listen-address={cfg.host}:{cfg.port}",
        ],
        ports={"metrics": (cfg.host, cfg.port)},
        probe=health.redis_exporter_ready,
        url=f"http://{cfg.host}:{cfg.port}/metrics",
    )


def kafka(settings: Settings) -> Component:
    cfg, home = settings.kafka, settings.stack.home / "kafka"
    libs = settings.kafka_home / "libs"
    props, log4j, data = home / "server.properties", home / "log4j2.properties", home / "data"
    java = _binary("java")

    def prepare() -> None:
        _require(libs, f"Apache Kafka {settings.stack.kafka_version} jars")
        _write_if_changed(
            props,
            _template("kafka-server.properties").substitute(
                host=cfg.host, port=cfg.port, controller_port=cfg.controller_port,
                data_dir=data, partitions=cfg.partitions,
            ),
        )
        _write_if_changed(log4j, _template("kafka-log4j2.properties").template)
        if not (data / "meta.properties").exists():
            # KRaft storage is formatted exactly once per data folder, with a fresh cluster id.
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            subprocess.run(
                [java, "-cp", f"{libs}/*", f"-Dlog4j2.configurationFile={log4j}",
                 "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)],
                check=True, capture_output=True, text=True, timeout=120,
            )

    async def create_topics() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=cfg.bootstrap_servers, client_id="vitrine-stack")
        await admin.start()
        try:
            existing = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(list(topics.ALL))
                        if t.get("error_code", 0) == 0}
            missing = [NewTopic(name, num_partitions=cfg.partitions, replication_factor=1)
                       for name in topics.ALL if name not in existing]
            if missing:
                await admin.create_topics(missing)
            grow = {name: NewPartitions(cfg.partitions) for name, count in existing.items() if count < cfg.partitions}
            if grow:
                await admin.create_partitions(grow)
        finally:
            await admin.close()

    return Component(
        name="kafka",
        command=[
            java, f"-Xmx{cfg.heap}", f"-Xms{cfg.heap}", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}", "-cp", f"{libs}/*", "kafka.Kafka", str(props),
        ],
        ports={"broker": (cfg.host, cfg.port), "controller": (cfg.host, cfg.controller_port)},
        probe=health.kafka_ready,
        url=f"kafka://{cfg.bootstrap_servers}",
        prepare=prepare,
        after_ready=create_topics,
    )


def triton(settings: Settings) -> Component:
    cfg, home = settings.triton, settings.triton_home
    binary = home / "bin" / "tritonserver"
    venv_bin = Path(sys.executable).parent
    # The python backend's stub embeds libpython: it must find the same interpreter (and site-packages
    # with numpy and onnxruntime) as this virtualenv, so the venv's bin comes first on PATH.
    lib_path = [str(home / "lib"), sysconfig.get_config_var("LIBDIR") or ""]

    def prepare() -> None:
        _require(binary, f"tritonserver from nvidia-pytriton {settings.stack.pytriton_version}")
        _require(cfg.model_repository, "the model repository")
        # A broken model folder is named with its problem here, before Triton is asked to serve it.
        validate_repository(cfg.model_repository)

    command = [
        str(binary),
        f"--model-repository={cfg.model_repository}",
        f"--backend-directory={home / 'backends'}",
        f"--model-control-mode={cfg.model_control_mode}",
        f"--http-address={cfg.host}", f"--http-port={cfg.http_port}",
        f"--grpc-address={cfg.host}", f"--grpc-port={cfg.grpc_port}",
        f"--metrics-address={cfg.host}", f"--metrics-port={cfg.metrics_port}",
        "--allow-metrics=true", "--allow-cpu-metrics=true", "--allow-gpu-metrics=false",
        # A model that fails to load is reported by the readiness probe with Triton's reason,
        # instead of taking every other model down with the server.
        "--exit-on-error=false",
        "--strict-readiness=true",
        "--log-verbose=0",
    ]
    if cfg.model_control_mode == "explicit":
        command.append("--load-model=*")
    if cfg.model_config_name:
        command.append(f"--model-config-name={cfg.model_config_name}")
    return Component(
        name="triton",
        command=command,
        ports={"http": (cfg.host, cfg.http_port), "grpc": (cfg.host, cfg.grpc_port),
               "metrics": (cfg.host, cfg.metrics_port)},
        probe=health.triton_ready,
        url=f"{cfg.http_url} (gRPC {cfg.grpc_url}, metrics http://{cfg.host}:{cfg.metrics_port}/metrics)",
        env={
            "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "LD_LIBRARY_PATH": os.pathsep.join(p for p in lib_path if p),
            "VIRTUAL_ENV": str(venv_bin.parent),
            # One onnxruntime thread per model instance: Triton runs instances side by side on 2 cores.
            "OMP_NUM_THREADS": "1",
        },
        prepare=prepare,
    )


def mlflow(settings: Settings) -> Component:
    """The model registry: MLflow's tracking server with its SQLite backend and proxied artifact store under
    the stack home. Clients upload and download artifacts through the server's HTTP API (`mlflow-artifacts:/`),
    so neither `vitrine export` nor the gateway needs the server's filesystem, as in production.
    The first start runs the database migrations (~20 s); `stack.startup_timeout_s` allows for it."""
    cfg, home = settings.registry, settings.stack.home / "mlflow"
    binary = Path(sys.executable).parent / "mlflow"

    def prepare() -> None:
        _require(binary, "the MLflow server (pip extra `registry`)")
        (home / "artifacts").mkdir(parents=True, exist_ok=True)

    return Component(
        name="mlflow",
        command=[
            str(binary), "server",
            "--backend-store-uri", f"sqlite:///{home / 'db.sqlite'}",
            "--artifacts-destination", str(home / "artifacts"),
            "--serve-artifacts",
            "--host", cfg.host, "--port", str(cfg.port),
            "--workers", str(cfg.workers),
        ],
        ports={"http": (cfg.host, cfg.port)},
        probe=health.mlflow_ready,
        url=f"{cfg.tracking_url} (UI and API; experiment {cfg.experiment!r})",
        prepare=prepare,
    )


def pipeline_trigger_token_file(settings: Settings) -> Path:
    """The bearer token Alertmanager sends to the trigger service (the file the service reads its token from)."""
    return settings.triggers_token_file


def pipeline_trigger_url(settings: Settings) -> str:
    """Where Alertmanager posts `action: retrain` alerts: the trigger service's webhook."""
    return f"http://{settings.triggers.host}:{settings.triggers.port}/alerts"


def render_alert_rules(settings: Settings) -> str:
    """deploy/prometheus/alerts.yml with `prometheus.alert_for`'s durations applied (the file itself stays the reviewed,
    promtool-checked source; the stack loads this rendering)."""
    rules = yaml.safe_load(ALERT_RULES.read_text())
    overrides = dict(settings.prometheus.alert_for)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") in overrides:
                rule["for"] = overrides.pop(rule["alert"])
    if overrides:
        raise ValueError(f"prometheus.alert_for names alerts that {ALERT_RULES} does not define: {', '.join(sorted(overrides))}")
    header = f"# Rendered by `vitrine stack up` from {ALERT_RULES} with prometheus.alert_for = {dict(settings.prometheus.alert_for)}.\n"
    return header + yaml.safe_dump(rules, sort_keys=False, width=4096, allow_unicode=True)


def render_alertmanager_config(settings: Settings) -> str:
    cfg = settings.alertmanager
    return Template(ALERTMANAGER_CONFIG.read_text()).substitute(
        group_wait=f"{cfg.group_wait_s}s", group_interval=f"{cfg.group_interval_s}s",
        repeat_interval=f"{cfg.repeat_interval_s}s", pipeline_trigger_url=pipeline_trigger_url(settings),
        token_file=str(pipeline_trigger_token_file(settings)),
    )


def alertmanager(settings: Settings) -> Component:
    """Routes Prometheus' alerts: `action: retrain` to the pipeline trigger's webhook, the rest to nowhere."""
    cfg, home = settings.alertmanager, settings.stack.home / "alertmanager"
    config = home / "alertmanager.yml"

    def prepare() -> None:
        (home / "data").mkdir(parents=True, exist_ok=True)
        ensure_token(pipeline_trigger_token_file(settings))  # the trigger service reads the same file
        _write_if_changed(config, render_alertmanager_config(settings))

    return Component(
        name="alertmanager",
        command=[
            _binary("prometheus-alertmanager"),
            f"--config.file={config}",
            f"--storage.path={home / 'data'}",
            f"--web.listen-address={cfg.host}:{cfg.port}",
            # A single instance: no gossip port (it would need one more port per stack).
            "--cluster.listen-address=",
        ],
        ports={"web": (cfg.host, cfg.port)},
        probe=health.alertmanager_ready,
        url=f"{cfg.url} (webhook → {pipeline_trigger_url(settings)} for action=retrain)",
        prepare=prepare,
    )


def prometheus(settings: Settings) -> Component:
    cfg, home = settings.prometheus, settings.stack.home / "prometheus"
    config, rules = home / "prometheus.yml", home / "alerts.yml"

    def prepare() -> None:
        (home / "data").mkdir(parents=True, exist_ok=True)
        (home / EXTRA_RULES_DIR).mkdir(parents=True, exist_ok=True)
        _write_if_changed(rules, render_alert_rules(settings))
        _write_if_changed(
            config,
            _template("prometheus.yml").substitute(
                scrape_interval=f"{cfg.scrape_interval_s:g}s",
                prometheus_target=f"{cfg.host}:{cfg.port}",
                redis_exporter_target=f"{settings.redis_exporter.host}:{settings.redis_exporter.port}",
                triton_metrics_target=f"{settings.triton.host}:{settings.triton.metrics_port}",
                features_target=f"{settings.features.metrics_host}:{settings.features.metrics_port}",
                outcomes_target=f"{settings.outcomes.metrics_host}:{settings.outcomes.metrics_port}",
                archive_target=f"{settings.archive.metrics_host}:{settings.archive.metrics_port}",
                gateway_target=f"{settings.gateway.metrics_host}:{settings.gateway.metrics_port}",
                triggers_target=f"{settings.triggers.host}:{settings.triggers.port}",
                rollouts_target=f"{settings.rollouts.metrics_host}:{settings.rollouts.metrics_port}",
                rules_file=str(rules),
                extra_rules=str(home / EXTRA_RULES_DIR / "*.yml"),
                alertmanager_target=f"{settings.alertmanager.host}:{settings.alertmanager.port}",
            ),
        )

    return Component(
        name="prometheus",
        command=[
            _binary("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--storage.tsdb.retention.time={cfg.retention}",
            f"--web.listen-address={cfg.host}:{cfg.port}",
            "--web.enable-lifecycle",
        ],
        ports={"web": (cfg.host, cfg.port)},
        probe=health.prometheus_ready,
        url=cfg.url,
        prepare=prepare,
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as VITRINE_<SECTION> JSON variables: a child process sees exactly this stack's settings."""
    return {f"VITRINE_{name.upper()}": getattr(settings, name).model_dump_json() for name in type(settings).model_fields}


def local_gateway_settings(settings: Settings) -> Settings:
    """The local stack's gateway: the published demo keys and reflection on, when `stack.demo_keys` says so.
    Outside the local stack both are off by default, and a gateway without keys refuses to start."""
    if not settings.stack.demo_keys:
        return settings
    return settings.model_copy(update={"gateway": settings.gateway.model_copy(update={"demo_keys": True, "reflection": True})})


def features(settings: Settings) -> Component:
    cfg = settings.features
    return Component(
        name="features",
        command=[sys.executable, "-m", "vitrine", "features", "run"],
        ports={"metrics": (cfg.metrics_host, cfg.metrics_port)},
        probe=health.features_ready,
        url=f"http://{cfg.metrics_host}:{cfg.metrics_port}/metrics (group {cfg.group_id}, topic {cfg.events_topic})",
        env=settings_env(settings),
    )


def outcomes(settings: Settings) -> Component:
    cfg = settings.outcomes
    return Component(
        name="outcomes",
        command=[sys.executable, "-m", "vitrine", "outcomes", "run"],
        ports={"metrics": (cfg.metrics_host, cfg.metrics_port)},
        probe=health.outcomes_ready,
        url=f"http://{cfg.metrics_host}:{cfg.metrics_port}/metrics (group {cfg.group_id}, {cfg.exposures_topic} ⋈ {cfg.events_topic})",
        env=settings_env(settings),
    )


def archive(settings: Settings) -> Component:
    cfg, root = settings.archive, settings.archive_root
    return Component(
        name="archive",
        command=[sys.executable, "-m", "vitrine", "archive", "run"],
        ports={"metrics": (cfg.metrics_host, cfg.metrics_port)},
        probe=health.archive_ready,
        url=f"http://{cfg.metrics_host}:{cfg.metrics_port}/metrics (group {cfg.group_id}, {cfg.events_topic} + {cfg.exposures_topic} → {root})",
        env=settings_env(settings),
        prepare=lambda: root.mkdir(parents=True, exist_ok=True),
    )


def gateway(settings: Settings) -> Component:
    cfg = settings.gateway
    return Component(
        name="gateway",
        command=[sys.executable, "-m", "vitrine", "gateway", "run"],
        ports={"grpc": (cfg.host, cfg.port), "metrics": (cfg.metrics_host, cfg.metrics_port)},
        probe=health.gateway_ready,
        url=f"grpc://{cfg.address} (metrics http://{cfg.metrics_host}:{cfg.metrics_port}/metrics)",
        env=settings_env(local_gateway_settings(settings)),
    )


def rollouts(settings: Settings) -> Component:
    """The rollout controller: judges running rollouts against control and moves the experiment's split."""
    cfg = settings.rollouts
    return Component(
        name="rollouts",
        command=[sys.executable, "-m", "vitrine", "rollouts", "run"],
        ports={"metrics": (cfg.metrics_host, cfg.metrics_port)},
        probe=health.rollouts_ready,
        url=f"http://{cfg.metrics_host}:{cfg.metrics_port}/metrics (every {cfg.interval_s:g} s; `vitrine rollout status`)",
        env=settings_env(settings),
    )


def ensure_token(path: Path) -> None:
    """The bearer token Alertmanager must send: created once (random, mode 0600), never overwritten."""
    import secrets

    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(32) + "\n")


def triggers(settings: Settings) -> Component:
    cfg = settings.triggers
    token = settings.triggers_token_file
    return Component(
        name="triggers",
        command=[sys.executable, "-m", "vitrine", "triggers", "run"],
        ports={"http": (cfg.host, cfg.port)},
        probe=health.triggers_ready,
        url=f"http://{cfg.host}:{cfg.port}/alerts (Alertmanager webhook, bearer token in {token}; /healthz, /metrics)",
        env=settings_env(settings),
        prepare=lambda: ensure_token(token),
    )


BUILDERS: tuple[Callable[[Settings], Component], ...] = (
    redis, redis_exporter, kafka, mlflow, triton, features, outcomes, archive, gateway, rollouts, triggers, alertmanager, prometheus)
"""Start order: dependencies first (the gateway fetches versions' metadata from MLflow), the trigger service before
Alertmanager, which posts to it, Alertmanager before Prometheus, which sends it alerts, and Prometheus last so that
its targets are already up."""


def build_all(settings: Settings) -> list[Component]:
    return [build(settings) for build in BUILDERS]
