"""Readiness probes, one per component. Each returns None when healthy or a short reason when not.

Probes answer "can a client use it now?", not "is the process alive?": supervisord already knows the latter.
"""

from __future__ import annotations

import math

import httpx
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient

from vitrine.export import smoke
from vitrine.settings import Settings

PROBE_TIMEOUT_S = 2.0


async def redis_ready(settings: Settings) -> str | None:
    client = aioredis.Redis(
        host=settings.redis.host,
        port=settings.redis.port,
        socket_connect_timeout=PROBE_TIMEOUT_S,
        socket_timeout=PROBE_TIMEOUT_S,
    )
    try:
        if await client.ping():
            loading = (await client.info("persistence")).get("loading", 0)
            return "loading its append-only file" if loading else None
        return "PING was not answered with PONG"
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", reported as text
        return f"{type(exc).__name__}: {exc}"
    finally:
        await client.aclose()


async def kafka_ready(settings: Settings) -> str | None:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        request_timeout_ms=int(PROBE_TIMEOUT_S * 1000),
        client_id="vitrine-stack-probe",
    )
    try:
        await admin.start()
        await admin.list_topics()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    finally:
        await admin.close()


async def _http_ok(url: str) -> str | None:
    try:
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S) as client:
            response = await client.get(url)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if response.status_code != 200:
        return f"GET {url} answered {response.status_code}: {response.text[:200]}"
    return None


async def triton_ready(settings: Settings) -> str | None:
    """Server ready and every model in the repository loaded: a model that failed to load is named with its reason."""
    base = settings.triton.http_url
    if reason := await _http_ok(f"{base}/v2/health/live"):
        return reason
    try:
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S) as client:
            index = (await client.post(f"{base}/v2/repository/index", json={})).json()
    except (httpx.HTTPError, ValueError) as exc:
        return f"repository index unavailable: {exc}"
    problems = [
        f"model {m['name']} v{m.get('version', '?')} {m.get('state', 'UNKNOWN')}: {m.get('reason', '')}".strip()
        for m in index
        if m.get("state") != "READY"
    ]
    if problems:
        return "; ".join(problems)
    if reason := await _http_ok(f"{base}/v2/health/ready"):
        return reason
    if any(m["name"] == smoke.NAME for m in index):
        return await _smoke_inference(base)
    return None


async def _smoke_inference(base: str) -> str | None:
    """READY is not enough: a python-backend stub built against another numpy answers READY and then
    returns empty tensors. One real inference of the smoke model proves the whole CPU serving path."""
    request = {
        "inputs": [
            {"name": smoke.INPUT, "shape": [1, smoke.FEATURES], "datatype": "FP32", "data": [0.0] * smoke.FEATURES}
        ]
    }
    try:
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S) as client:
            response = await client.post(f"{base}/v2/models/{smoke.NAME}/infer", json=request)
        outputs = {o["name"]: o for o in response.json().get("outputs", [])}
        data = outputs[smoke.OUTPUT]["data"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return f"smoke inference failed: {type(exc).__name__}: {exc}"
    if len(data) != smoke.OUTPUTS or not all(math.isfinite(v) for v in data):
        return f"smoke inference returned {len(data)} values instead of {smoke.OUTPUTS} finite scores: {data[:8]}"
    return None


async def prometheus_ready(settings: Settings) -> str | None:
    return await _http_ok(f"{settings.prometheus.url}/-/ready")


async def mlflow_ready(settings: Settings) -> str | None:
    """The server answers /health and a real registry call (the database is migrated and answers queries)."""
    base = settings.registry.tracking_url
    if reason := await _http_ok(f"{base}/health"):
        return reason
    return await _http_ok(f"{base}/api/2.0/mlflow/registered-models/search?max_results=1")


async def alertmanager_ready(settings: Settings) -> str | None:
    """Ready (config loaded) and its v2 API answers: Prometheus can post alerts to it."""
    base = settings.alertmanager.url
    if reason := await _http_ok(f"{base}/-/ready"):
        return reason
    return await _http_ok(f"{base}/api/v2/status")


async def redis_exporter_ready(settings: Settings) -> str | None:
    return await _http_ok(f"http://{settings.redis_exporter.host}:{settings.redis_exporter.port}/metrics")


async def features_ready(settings: Settings) -> str | None:
    """The consumer serves metrics and owns at least one partition (it has joined its group)."""
    from vitrine.services.features.metrics import ASSIGNED_PARTITIONS

    return await _owns_partitions(f"http://{settings.features.metrics_host}:{settings.features.metrics_port}/metrics",
                                  ASSIGNED_PARTITIONS)


async def outcomes_ready(settings: Settings) -> str | None:
    """The outcome service serves metrics and owns at least one partition (it has joined its group)."""
    from vitrine.services.outcomes.metrics import ASSIGNED_PARTITIONS

    return await _owns_partitions(f"http://{settings.outcomes.metrics_host}:{settings.outcomes.metrics_port}/metrics",
                                  ASSIGNED_PARTITIONS)


async def archive_ready(settings: Settings) -> str | None:
    """The archive serves metrics, owns at least one partition (so it has recovered that partition's files and
    sought to their offsets: recovery runs on assignment) and can write into its root folder."""
    import os

    from vitrine.services.archive.metrics import ASSIGNED_PARTITIONS

    root = settings.archive_root
    if not root.is_dir() or not os.access(root, os.W_OK | os.X_OK):
        return f"archive root {root} is not a writable folder"
    return await _owns_partitions(f"http://{settings.archive.metrics_host}:{settings.archive.metrics_port}/metrics",
                                  ASSIGNED_PARTITIONS)


async def triggers_ready(settings: Settings) -> str | None:
    """The trigger service answers GET /healthz (its token was readable: it refuses to start without one)."""
    url = f"http://{settings.triggers.host}:{settings.triggers.port}/healthz"
    try:
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S) as client:
            response = await client.get(url)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if response.status_code != 200 or response.json().get("status") != "ok":
        return f"GET /healthz answered {response.status_code}"
    return None


async def rollouts_ready(settings: Settings) -> str | None:
    """The rollout controller serves metrics and has read the rollout's state from Redis at least once."""
    from vitrine.services.rollouts.metrics import LAST_TICK

    url = f"http://{settings.rollouts.metrics_host}:{settings.rollouts.metrics_port}/metrics"
    try:
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S) as client:
            response = await client.get(url)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    for line in response.text.splitlines():
        if line.startswith(LAST_TICK + " "):
            return None if float(line.split()[1]) > 0 else "has not reached Redis yet"
    return f"{LAST_TICK} not exported"


async def _owns_partitions(url: str, gauge: str) -> str | None:
    try:
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S) as client:
            response = await client.get(url)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    for line in response.text.splitlines():
        if line.startswith(gauge + " "):
            return None if float(line.split()[1]) > 0 else "no partition assigned yet"
    return f"{gauge} not exported"


async def gateway_ready(settings: Settings) -> str | None:
    """The gateway answers SERVING, and so do its dependencies' health names (Redis reachable, every
    variant's model ready): the stack is up when a request gets a model's answer, not a degraded one."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from vitrine.services.gateway.server import DEPENDENCY_HEALTH

    try:
        async with grpc.aio.insecure_channel(settings.gateway.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", *DEPENDENCY_HEALTH.values()):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=PROBE_TIMEOUT_S)
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                    return f"health status {status}" + (f" for {service}" if service else "")
    except grpc.aio.AioRpcError as exc:
        return f"health check failed: {exc.code().name}"
    return None
