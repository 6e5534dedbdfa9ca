"""Wiring of the gateway: gRPC server (auth, health, reflection, optional TLS), metrics, background tasks.

`vitrine gateway run` runs `main`; `vitrine stack up` runs it as the `gateway` component.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
import redis.asyncio as aioredis
import tritonclient.grpc.aio as triton
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server

from vitrine.services.features.store import FeatureStore
from vitrine.services.gateway.admin import ExperimentAdminService
from vitrine.services.gateway.auth import AuthInterceptor
from vitrine.services.gateway.drift import DriftMonitor
from vitrine.services.gateway.experiment import Experiment, ExperimentFollower, ExperimentStore, Variant
from vitrine.services.gateway.exposures import ExposureLog
from vitrine.services.gateway.fallback import PopularityFallback
from vitrine.services.gateway.metrics import GatewayMetrics
from vitrine.services.gateway.ranking import ModelCatalog, RankerPool
from vitrine.services.gateway.service import RecommenderService
from vitrine.services.heap import freeze_startup_objects
from vitrine.settings import Settings
from vitrine.v1 import recommender_pb2 as pb
from vitrine.v1 import recommender_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICES = (pb.DESCRIPTOR.services_by_name["Recommender"].full_name, pb.DESCRIPTOR.services_by_name["ExperimentAdmin"].full_name)


class Gateway:
    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        cfg = settings.gateway
        self.metrics = GatewayMetrics(registry)
        self.redis = aioredis.Redis(host=settings.redis.host, port=settings.redis.port, socket_connect_timeout=1, socket_timeout=2)
        self.store = FeatureStore(self.redis, settings.features)
        self.triton = triton.InferenceServerClient(settings.triton.grpc_url)
        self.catalog = ModelCatalog(self.triton, settings.triton.model_repository, cfg.refresh_s)
        self.rankers = RankerPool(cfg, self.triton, self.metrics)
        depth = cfg.max_k + cfg.max_exclusions + settings.features.purchased_max
        self.fallback = PopularityFallback(self.store, depth, cfg.refresh_s, cfg.redis_timeout_ms / 1000)
        self.exposures = ExposureLog(settings.kafka.bootstrap_servers, cfg.exposure_buffer, self.metrics, cfg.exposure_linger_ms)
        self.experiments = ExperimentStore(self.redis, settings.features.namespace)
        self.drift = DriftMonitor(self.metrics, cfg.drift_window, cfg.drift_interval_s, cfg.drift_min_observations)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.follower: ExperimentFollower | None = None
        self._tasks: list[asyncio.Task] = []

    def _on_experiment(self, experiment: Experiment) -> None:
        self.metrics.variant_weight.clear()
        for v in experiment.variants:
            self.metrics.variant_weight.labels(v.name, v.model_name, v.model_version or "newest").set(v.weight)
        self.metrics.experiment_revision.set(experiment.revision)

    async def _initial_experiment(self) -> Experiment:
        try:
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
        self._tasks.append(asyncio.create_task(self._watch_health()))
        server = grpc.aio.server(
            interceptors=[AuthInterceptor(cfg.api_keys, lambda method, code: self.metrics.requests.labels(method, code.name, "").inc())],
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4 * 1024 * 1024)],
        )
        pb_grpc.add_RecommenderServicer_to_server(
            RecommenderService(cfg, self.store, self.follower, self.catalog, self.rankers, self.fallback, self.exposures,
                               self.metrics, self.drift), server)
        pb_grpc.add_ExperimentAdminServicer_to_server(ExperimentAdminService(cfg, self.experiments, self.follower, self.catalog), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
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
        """SERVING while Redis answers and every variant's model is ready in Triton."""
        while True:
            try:
                redis_ok = bool(await asyncio.wait_for(self.redis.ping(), 1.0))
            except Exception:  # noqa: BLE001
                redis_ok = False
            models_ok = True
            assert self.follower is not None
            for v in self.follower.current.variants:
                ready = await self.catalog.is_ready(v.model_name, v.model_version)
                self.metrics.model_ready.labels(v.model_name, v.model_version or "newest").set(1 if ready else 0)
                models_ok &= ready
            status = health_pb2.HealthCheckResponse.SERVING if redis_ok and models_ok else health_pb2.HealthCheckResponse.NOT_SERVING
            for service in ("", *SERVICES):
                await self.health.set(service, status)
            await asyncio.sleep(self.settings.gateway.refresh_s)

    async def stop(self, grace_s: float = 5.0) -> None:
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
    disable_created_metrics()
    registry = CollectorRegistry()
    start_http_server(settings.gateway.metrics_port, settings.gateway.metrics_host, registry=registry)

    async def serve() -> None:
        gateway = Gateway(settings, registry)
        await gateway.start()
        freeze_startup_objects()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await gateway.stop()

    asyncio.run(serve())
