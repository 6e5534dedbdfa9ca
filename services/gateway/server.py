"""Wiring of the gateway: gRPC server (auth, health, reflection, optional TLS), metrics, background tasks.

`vitrine gateway run` runs `main`; `vitrine stack up` runs it as the `gateway` component.

Health (grpc.health.v1): the overall status ("" and each Vitrine service) is SERVING while the gateway
can answer — with Redis or Triton down it still answers, degraded and counted, so a readiness probe must
not drain every gateway at once during such an outage; it turns NOT_SERVING only while shutting down.
Each dependency has a health service name of its own (`DEPENDENCY_HEALTH`) and a gauge
(`vitrine_gateway_dependency_up`), for dashboards, alerts and `vitrine stack up`'s readiness probe.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
import tritonclient.grpc.aio as triton
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server

from vitrine.contracts.exposures import INTERLEAVE
from vitrine.services.features.store import FeatureStore
from vitrine.services.gateway.admin import ExperimentAdminService
from vitrine.services.gateway.auth import AuthInterceptor
from vitrine.services.gateway.baselines import BaselineStore
from vitrine.services.gateway.drift import DriftMonitor
from vitrine.services.gateway.experiment import Experiment, ExperimentFollower, ExperimentStore, Variant
from vitrine.services.gateway.exposures import ExposureLog
from vitrine.services.gateway.fallback import PopularityFallback
from vitrine.services.gateway.metrics import GatewayMetrics, label_sets
from vitrine.services.gateway.ranking import ModelCatalog, RankerPool
from vitrine.services.gateway.service import RecommenderService
from vitrine.services.heap import freeze_startup_objects
from vitrine.settings import ApiKey, GatewaySettings, Settings
from vitrine.v1 import recommender_pb2 as pb
from vitrine.v1 import recommender_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICES = (pb.DESCRIPTOR.services_by_name["Recommender"].full_name, pb.DESCRIPTOR.services_by_name["ExperimentAdmin"].full_name)
DEPENDENCY_HEALTH = {"redis": "vitrine.dependency.redis", "triton": "vitrine.dependency.triton"}
"""Health service names that report one dependency each (Triton: every variant's model ready)."""
EVICT_AFTER_SWEEPS = 2
"""A model version unused for this many health sweeps (each `refresh_s`) has its per-version state freed."""


class ConfigurationError(RuntimeError):
    """The gateway cannot start with these settings (said in words an operator can act on)."""


def required_keys(cfg: GatewaySettings) -> dict[str, ApiKey]:
    """The keys the gateway accepts; none at all is a configuration error, never an open gateway."""
    keys = cfg.accepted_keys
    if not keys:
        raise ConfigurationError(
            "no API keys: set gateway.api_keys (sha256 of each key → name and role), or gateway.demo_keys = true "
            "to accept the published demo keys (only for a local stack; `vitrine stack up` does this)")
    return keys


class Gateway:
    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        cfg = settings.gateway
        self.keys = required_keys(cfg)
        self.metrics = GatewayMetrics(registry)
        # One quick retry (a pooled connection gone stale after a Redis restart), never a back-off: every
        # call is bounded by the request's budget and degrades instead of waiting.
        self.redis = aioredis.Redis(host=settings.redis.host, port=settings.redis.port, socket_connect_timeout=1, socket_timeout=2,
                                    retry=Retry(NoBackoff(), 1))
        self.store = FeatureStore(self.redis, settings.features)
        self.triton = triton.InferenceServerClient(settings.triton.grpc_url)
        self.catalog = ModelCatalog(self.triton, settings.triton.model_repository, cfg.refresh_s, cfg.triton_timeout_ms / 1000,
                                    settings.registry.tracking_url, settings.registry.timeout_s)
        self.rankers = RankerPool(cfg, self.triton, self.metrics)
        depth = cfg.max_k + cfg.max_exclusions + settings.features.purchased_max
        self.fallback = PopularityFallback(self.store, depth, cfg.refresh_s, cfg.redis_timeout_ms / 1000)
        self.exposures = ExposureLog(settings.kafka.bootstrap_servers, cfg.exposure_buffer, self.metrics, cfg.exposure_linger_ms,
                                     cfg.exposure_send_timeout_ms)
        self.experiments = ExperimentStore(self.redis, settings.features.namespace)
        baselines = BaselineStore(self.redis, settings.features.namespace, cfg.drift_baseline_observations, cfg.drift_baseline_ttl_s,
                                  cfg.admin_timeout_ms / 1000)
        self.drift = DriftMonitor(self.metrics, cfg.drift_window, cfg.drift_interval_s, cfg.drift_min_observations,
                                  cfg.drift_reference, cfg.drift_baseline_observations, baselines)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.follower: ExperimentFollower | None = None
        self._tasks: list[asyncio.Task] = []
        self._unused_sweeps: dict[tuple[str, str], int] = {}

    def _on_experiment(self, experiment: Experiment) -> None:
        self.metrics.variant_weight.clear()
        for v in experiment.variants:
            self.metrics.variant_weight.labels(v.name, v.model_name, v.model_version or "newest").set(v.weight)
        self.metrics.experiment_revision.set(experiment.revision)

    async def _initial_experiment(self) -> Experiment:
        try:
            async with asyncio.timeout(self.settings.gateway.admin_timeout_ms / 1000):
                return await self.experiments.seed(self.settings.gateway.default_variants)
        except Exception as exc:  # noqa: BLE001 - Redis away at start: serve the configured default meanwhile
            log.warning("experiment store unavailable (%s); using the configured default until it answers", exc)
            return Experiment(salt="vitrine", variants=tuple(Variant(**v.model_dump()) for v in self.settings.gateway.default_variants))

    async def start(self) -> None:
        cfg = self.settings.gateway
        self.follower = ExperimentFollower(self.experiments, await self._initial_experiment(), cfg.experiment_poll_s, self._on_experiment)
        self.follower.start()
        self.fallback.start()
        self.exposures.start()
        self.drift.start()
        await self.check_health()  # every health name answers from the first call on (none is NOT_FOUND)
        self._tasks.append(asyncio.create_task(self._watch_health()))
        interceptor = AuthInterceptor(
            self.keys, on_denied=lambda method, code: self.metrics.requests.labels(method, code.name, "").inc(),
            on_malformed=lambda method: self.metrics.malformed.labels(method).inc(), error_log_interval_s=cfg.error_log_interval_s)
        server = grpc.aio.server(
            interceptors=[interceptor],
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4 * 1024 * 1024)],
        )
        pb_grpc.add_RecommenderServicer_to_server(
            RecommenderService(cfg, self.store, self.follower, self.catalog, self.rankers, self.fallback, self.exposures,
                               self.metrics, self.drift), server)
        pb_grpc.add_ExperimentAdminServicer_to_server(ExperimentAdminService(cfg, self.experiments, self.follower, self.catalog), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if cfg.reflection:
            reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        if cfg.tls_cert and cfg.tls_key:
            credentials = grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())])
            bound = server.add_secure_port(cfg.address, credentials)
        else:
            bound = server.add_insecure_port(cfg.address)
        if not bound:
            raise OSError(f"gateway: cannot listen on {cfg.address}")
        await server.start()
        self.server = server
        log.info("gateway listening on %s (%s)", cfg.address, "TLS" if cfg.tls_cert else "plaintext")

    async def _watch_health(self) -> None:
        while True:
            try:
                await self.check_health()
                await self.evict_unused()
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive any one failure
                log.warning("health sweep failed: %s", exc)
            await asyncio.sleep(self.settings.gateway.refresh_s)

    async def check_health(self) -> dict[str, bool]:
        """Overall SERVING (the gateway answers, degraded if it must); each dependency on its own."""
        try:
            redis_ok = bool(await asyncio.wait_for(self.redis.ping(), self.settings.gateway.admin_timeout_ms / 1000))
        except Exception:  # noqa: BLE001
            redis_ok = False
        models_ok = True
        assert self.follower is not None
        for v in self.follower.current.variants:
            ready = await self.catalog.is_ready(v.model_name, v.model_version)
            self.metrics.model_ready.labels(v.model_name, v.model_version or "newest").set(1 if ready else 0)
            models_ok &= ready
        up = {"redis": redis_ok, "triton": models_ok}
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        for dependency, ok in up.items():
            self.metrics.dependency_up.labels(dependency).set(1 if ok else 0)
            await self.health.set(DEPENDENCY_HEALTH[dependency], serving if ok else not_serving)
        for service in ("", *SERVICES):
            await self.health.set(service, serving)
        return up

    async def evict_unused(self) -> None:
        """Free what a model version no longer served holds (vocabulary, batcher, metric series), once
        it has been unused for `EVICT_AFTER_SWEEPS` sweeps — requests resolved just before a switch finish first."""
        assert self.follower is not None
        variants = self.follower.current.variants
        used = self.catalog.in_use((v.model_name, v.model_version) for v in variants)
        held = self.catalog.loaded() | self.rankers.loaded()
        for key in held - used:
            self._unused_sweeps[key] = self._unused_sweeps.get(key, 0) + 1
        for key in used:
            self._unused_sweeps.pop(key, None)
        stale = {key for key, sweeps in self._unused_sweeps.items() if sweeps >= EVICT_AFTER_SWEEPS}
        if stale:
            self.catalog.evict(stale)
            await self.rankers.evict(stale)
            for key in stale:
                del self._unused_sweeps[key]
            log.info("freed the state of model versions no longer served: %s", sorted(stale))
        self.drift.forget(keep_variants={v.name for v in variants})
        self._forget_series(variants, stale)

    def _forget_series(self, variants: tuple[Variant, ...], stale: set[tuple[str, str]]) -> None:
        """Series of variants that left the experiment, and of evicted versions, stop being exported."""
        model_of = {v.name: v.model_name for v in variants}
        if self.follower is not None and self.follower.current.mode == INTERLEAVE:
            model_of[INTERLEAVE] = ""  # interleaved answers are labelled with the mode's name
        for metric in (self.metrics.duration, self.metrics.top1, self.metrics.mean_topk):
            for variant, version in label_sets(metric, ("variant", "model_version")):
                if variant not in model_of or (model_of[variant], version) in stale:
                    metric.remove(variant, version)
        for reason, variant, source in label_sets(self.metrics.degraded, ("reason", "variant", "source")):
            if variant not in model_of:
                self.metrics.degraded.remove(reason, variant, source)
        for source, variant in label_sets(self.metrics.answers, ("source", "variant")):
            if variant not in model_of:
                self.metrics.answers.remove(source, variant)
        for method, code, variant in label_sets(self.metrics.requests, ("method", "code", "variant")):
            if variant and variant not in model_of:
                self.metrics.requests.remove(method, code, variant)
        live_models = {(v.model_name, v.model_version or "newest") for v in variants}
        for labels in label_sets(self.metrics.model_ready, ("model_name", "model_version")):
            if labels not in live_models:
                self.metrics.model_ready.remove(*labels)

    async def stop(self, grace_s: float = 5.0) -> None:
        # Readiness probes see NOT_SERVING first, so balancers stop sending before calls are refused.
        await self.health.enter_graceful_shutdown()
        if self.server:
            await self.server.stop(grace_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.follower:
            await self.follower.stop()
        await self.fallback.stop()
        await self.drift.stop()
        await self.rankers.stop()
        await self.exposures.stop()
        await self.triton.close()
        await self.redis.aclose()


def main(settings: Settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    try:
        required_keys(settings.gateway)
    except ConfigurationError as exc:
        log.error("gateway cannot start: %s", exc)
        raise SystemExit(2) from None
    disable_created_metrics()
    registry = CollectorRegistry()
    start_http_server(settings.gateway.metrics_port, settings.gateway.metrics_host, registry=registry)

    async def serve() -> None:
        try:
            gateway = Gateway(settings, registry)
        except ConfigurationError as exc:
            log.error("gateway cannot start: %s", exc)
            raise SystemExit(2) from None
        await gateway.start()
        freeze_startup_objects()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await gateway.stop()

    asyncio.run(serve())
