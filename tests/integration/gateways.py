"""A gateway of a test's own beside the stack: its own ports, Redis namespace and settings, so that a
test may break or reconfigure it without touching the stack's gateway or other tests."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vitrine.services.stack.components import settings_env
from vitrine.services.stack.launcher import free_port
from vitrine.settings import Settings

STARTS = 3
"""Attempts at start-up: a port handed out by free_port can be taken by another process before the child binds it."""


async def health(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return reply.status


async def metrics_text(settings: Settings) -> str:
    async with httpx.AsyncClient() as client:
        reply = await client.get(f"http://{settings.gateway.metrics_host}:{settings.gateway.metrics_port}/metrics", timeout=5)
    reply.raise_for_status()
    return reply.text


@asynccontextmanager
async def private_gateway(base: Settings, namespace: str | None = None, timeout_s: float = 60, **overrides: object) -> AsyncIterator[Settings]:
    """Start `vitrine gateway run` with the demo keys and `overrides`; yields its settings once it answers health checks."""
    for attempt in range(STARTS):
        gateway = base.gateway.model_copy(update={"port": free_port(), "metrics_port": free_port(), "demo_keys": True, **overrides})
        features = base.features.model_copy(update={"namespace": namespace}) if namespace else base.features
        settings = base.model_copy(update={"gateway": gateway, "features": features})
        # stderr to a file, not a pipe nobody drains: a gateway that logs a lot (Kafka away) would block on a full pipe.
        log = tempfile.TemporaryFile()
        process = subprocess.Popen([sys.executable, "-m", "vitrine", "gateway", "run"], env={**os.environ, **settings_env(settings)},
                                   stdout=subprocess.DEVNULL, stderr=log)
        try:
            if await _answers(process, settings, timeout_s):
                yield settings
                return
            log.seek(0)
            error = log.read().decode(errors="replace")
            if "cannot listen" not in error and "address already in use" not in error.lower() or attempt == STARTS - 1:
                raise AssertionError(f"private gateway exited with {process.returncode}:\n{error[-3000:]}")
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            log.close()


async def _answers(process: subprocess.Popen, settings: Settings, timeout_s: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if process.poll() is not None:
            return False
        try:
            if await health(settings.gateway.address) == health_pb2.HealthCheckResponse.SERVING:
                return True
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"private gateway did not answer within {timeout_s:g}s")
