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

from tests.pipeline_data import recent, write_archive
from vitrine.services.stack import Stack
from vitrine.services.stack.components import DRIFT_ALERT
from vitrine.settings import Settings

TEST_PORT_OFFSET = int(os.environ.get("VITRINE_TEST_PORT_OFFSET", "1000"))
"""Ports of the test stack: the default ports + this (another value lets two test runs share a machine)."""
REUSE_ENV = "VITRINE_TEST_REUSE_STACK"
RETRAIN_PREFIX = "alerted_"
"""Model-name prefix of the runs the test stack's trigger service starts."""
RETRAIN_ARCHIVE = "retrain-archive"
"""Under the test stack's home: the archive those runs read (the small storefront, written at session start)."""

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
    # A pipeline run started by the stack's own trigger service (the drift alert of test_observability's drifted
    # traffic, test_retrain_loop) trains one small model under a private name on an archive of its own, so that it
    # neither takes the CPU for minutes nor adds versions of the models other tests serve. It is gated against
    # popularity only (a 6-epoch model on the small storefront does not beat the transition table) and without slices
    # (its validation rows are too few): the chain is what the test proves; the gate's rules have their own tests.
    retrain_archive = shifted.stack.home / RETRAIN_ARCHIVE
    shutil.rmtree(retrain_archive, ignore_errors=True)
    shutil.rmtree(shifted.pipeline_home, ignore_errors=True)  # runs of an earlier session are not this session's
    # Alertmanager's notification log too: it does not notify again, within repeat_interval, alerts it has notified
    # before (as production should) — an earlier session's drift alerts would silence this session's.
    shutil.rmtree(shifted.stack.home / "alertmanager" / "data", ignore_errors=True)
    write_archive(retrain_archive, recent("small"))
    pipeline = shifted.pipeline.model_copy(update={
        "models": ("gru4rec",), "epochs": 6, "model_prefix": RETRAIN_PREFIX, "archive_root": retrain_archive, "threads": 1,
        "min_events": 100, "max_empty_hour_share": 1.0, "window_days": 30, "gate_baselines": ("popularity",),
        "category_preset": "small"})
    gate = shifted.gate.model_copy(update={"min_slice_rows": 1_000_000})
    # The production drift rule with a short `for:`, Alertmanager's first notification after 5 s, no debounce (the
    # trigger still de-duplicates each notification): a drift alert turns into a run within a test's patience.
    prometheus = shifted.prometheus.model_copy(update={"alert_for": {DRIFT_ALERT: "15s"}})
    alertmanager = shifted.alertmanager.model_copy(update={"group_wait_s": 5})
    triggers = shifted.triggers.model_copy(update={"debounce_s": 0})
    # The stack's gateway captures drift baselines of a few requests, so that tests driving a few hundred answers see PSI
    # (test_observability); tests/integration/test_drift.py measures the default sizes on a gateway of its own.
    gateway = shifted.gateway.model_copy(update={"drift_baseline_observations": 100, "drift_min_observations": 50})
    # The stack's rollout controller judges every 0.5 s over ≥ 6 s (3 scrapes) with ≥ 15 requests per arm: tests hold
    # steps for seconds, not minutes (tests/integration/test_rollouts.py). The p99 of a few dozen requests is their
    # slowest one, so one scheduling hiccup on this busy machine would decide: 50 ms of slack instead of 5.
    rollouts = shifted.rollouts.model_copy(update={"interval_s": 0.5, "min_window_s": 6.0, "min_requests": 15, "p99_slack_s": 0.05})
    return shifted.model_copy(update={"triton": shifted.triton.model_copy(update={"model_repository": repository}),
                                      "pipeline": pipeline, "gateway": gateway, "gate": gate, "prometheus": prometheus,
                                      "alertmanager": alertmanager, "triggers": triggers, "rollouts": rollouts})


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
