"""The real stack for integration tests, started through the same `Stack` code as `vitrine stack up`.

By default the tests start their own stack on ports shifted by TEST_PORT_OFFSET, in its own folder and
with its own copy of the model repository, so that a developer's running demo stack is left alone, and
stop it at the end. With
VITRINE_TEST_REUSE_STACK=1 they use the stack that the current settings (env, VITRINE_CONFIG) describe,
which must already be up, and leave it running.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Iterator

import pytest

from vitrine.services.stack import Stack
from vitrine.settings import Settings

TEST_PORT_OFFSET = int(os.environ.get("VITRINE_TEST_PORT_OFFSET", "1000"))
"""Ports of the test stack: the default ports + this (another value lets two test runs share a machine)."""
REUSE_ENV = "VITRINE_TEST_REUSE_STACK"

logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


def _reuse() -> bool:
    return os.environ.get(REUSE_ENV, "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def settings() -> Settings:
    """The test stack serves a copy of the model repository, so that tests may export new versions."""
    base = Settings()
    if _reuse():
        return base
    shifted = base.shifted(TEST_PORT_OFFSET)
    repository = shifted.stack.home / "model_repository"
    shutil.rmtree(repository, ignore_errors=True)
    shutil.copytree(base.triton.model_repository, repository)
    # A pipeline run started by the stack's own trigger service (test_alerting) trains one small model under a private
    # name, so that it neither takes the CPU for minutes nor adds versions of the models other tests serve.
    pipeline = shifted.pipeline.model_copy(update={"models": ("gru4rec",), "epochs": 1, "model_prefix": "alerted_"})
    # The stack's gateway captures drift baselines of a few requests, so that tests driving a few hundred answers see PSI
    # (test_observability); tests/integration/test_drift.py measures the default sizes on a gateway of its own.
    gateway = shifted.gateway.model_copy(update={"drift_baseline_observations": 100, "drift_min_observations": 50})
    return shifted.model_copy(update={"triton": shifted.triton.model_copy(update={"model_repository": repository}),
                                      "pipeline": pipeline, "gateway": gateway})


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[Stack]:
    stack = Stack(settings)
    if _reuse():
        statuses = asyncio.run(stack.status())
        unhealthy = [f"{s.name} ({s.detail})" for s in statuses if not s.healthy]
        if unhealthy:
            pytest.fail(f"{REUSE_ENV} is set but the stack is not healthy: {', '.join(unhealthy)}")
        yield stack
        return
    asyncio.run(stack.up(report=lambda line: None))
    try:
        yield stack
    finally:
        asyncio.run(stack.down(report=lambda line: None))
