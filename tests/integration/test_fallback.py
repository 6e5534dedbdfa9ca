"""Champion, challenger and fallback as registry aliases on the real stack (MLflow, Triton, Redis, a gateway of the
test's own): `vitrine models fallback` under load, the pipeline's champion read from the registry, pruning that keeps
aliased versions, and a challenger withdrawn after failing its parity check in Triton."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis
import tritonclient.grpc.aio as triton
from typer.testing import CliRunner

from tests.integration.gateways import private_gateway
from tests.integration.invariants import eventually
from vitrine.cli import app
from vitrine.contracts.events import Event, EventType
from vitrine.export.aliases import protected_versions
from vitrine.export.data import sequences, synthetic
from vitrine.export.onnx_export import export_run
from vitrine.export.pipeline import publish
from vitrine.export.pipeline.champion import REGISTRY_SOURCE
from vitrine.export.pipeline.runner import Pipeline
from vitrine.export.registry import Registry
from vitrine.export.serving_check import ServingMismatch, load_and_verify
from vitrine.export.train import TrainConfig, train
from vitrine.loadtest.load_generator import Outcome
from vitrine.loadtest.load_generator import run as run_load
from vitrine.loadtest.serving_bench import DEADLINE_S
from vitrine.services.features.store import FeatureStore
from vitrine.services.gateway.client import GatewayClient
from vitrine.services.gateway.experiment import ExperimentStore
from vitrine.services.stack import Stack
from vitrine.services.stack.components import settings_env
from vitrine.settings import Settings, VariantSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
runner = CliRunner()
STOREFRONT = "vitrine-demo-storefront"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    table = synthetic.generate(synthetic.preset("tiny", seed=11))
    dataset = sequences.build(table, max_len=20, validation_fraction=0.1, seed=11)
    info = {"source": "synthetic:tiny", "seed": 11, "drift_at_day": None, "fingerprint": table.fingerprint(), "events": len(table)}
    return train(TrainConfig(architecture="gru4rec", epochs=1, threads=1), dataset, info, tmp_path_factory.mktemp("runs"), progress=False)


@pytest.fixture
def model_name(stack: Stack) -> Iterator[str]:
    """A model of this test's own in the stack's repository (removed afterwards; Triton unloads it)."""
    name = f"test_fb_{uuid.uuid4().hex[:8]}"
    yield name
    shutil.rmtree(stack.settings.triton.model_repository / name, ignore_errors=True)
    httpx.post(f"{stack.settings.triton.http_url}/v2/repository/models/{name}/unload", json={}, timeout=30)


def _registry(stack: Stack) -> Registry:
    cfg = stack.settings.registry
    return Registry(cfg.tracking_url, cfg.experiment, cfg.timeout_s)


def _export(stack: Stack, registry: Registry, run: Path, name: str, run_id: str, keep: int = 3,
            protected: frozenset[int] = frozenset()) -> int:
    result = export_run(run, stack.settings.triton.model_repository, name=name, max_k=20, keep_versions=keep,
                        publish=registry.publisher(run_id), protected=protected)
    asyncio.run(load_and_verify(stack.settings.triton.grpc_url, name, result.folder))
    return result.version


async def _write_histories(settings: Settings, vocabulary: list[str], users: list[str]) -> None:
    client = aioredis.Redis(host=settings.redis.host, port=settings.redis.port)
    store = FeatureStore(client, settings.features)
    now_ms = int(time.time() * 1000)
    try:
        for u, user in enumerate(users):
            items = [vocabulary[(u * 7 + n * 13) % len(vocabulary)] for n in range(6)]
            events = [Event(event_id=f"{user}-{n}", user_id=user, item_id=item, type=EventType.VIEW, ts_ms=now_ms - 1000 + n)
                      for n, item in enumerate(items)]
            written = await store.apply(events, group=f"test-{settings.features.namespace}", next_offsets={})
            assert not written.refused and all(written.applied)
    finally:
        await client.aclose()


async def _ready(stack: Stack, name: str, version: int) -> bool:
    client = triton.InferenceServerClient(stack.settings.triton.grpc_url)
    try:
        return await client.is_model_ready(name, str(version))
    finally:
        await client.close()


async def _serve_only(stack: Stack, name: str, versions: list[int]) -> None:
    """Make Triton serve only `versions` of `name` (a config override through the repository API)."""
    client = triton.InferenceServerClient(stack.settings.triton.grpc_url)
    try:
        config = (await client.get_model_config(name, as_json=True))["config"]
        config["version_policy"] = {"specific": {"versions": versions}}
        await client.load_model(name, config=json.dumps(config))
    finally:
        await client.close()


async def test_fallback_puts_the_previous_champion_back_under_load_without_a_failed_request(
        stack: Stack, tiny_run: Path, model_name: str) -> None:
    registry = _registry(stack)
    logged = registry.log_training_run(tiny_run, source="test_fallback")
    assert await asyncio.to_thread(_export, stack, registry, tiny_run, model_name, logged.run_id) == 1
    assert await asyncio.to_thread(_export, stack, registry, tiny_run, model_name, logged.run_id) == 2
    # Registry versions deliberately in the other order than Triton's: registry 1 = Triton 2, registry 2 = Triton 1,
    # so confusing the two numbers routes to the wrong version.
    assert registry.register_version(model_name, logged.run_id, 2).version == "1"
    assert registry.register_version(model_name, logged.run_id, 1).version == "2"
    namespace = f"fb{uuid.uuid4().hex[:8]}"
    env_settings = stack.settings.model_copy(update={"features": stack.settings.features.model_copy(update={"namespace": namespace})})

    async def vitrine(*args: str):  # noqa: ANN202 - click's Result
        return await asyncio.to_thread(runner.invoke, app, list(args), env=settings_env(env_settings))

    # Errors before anything changes: no fallback alias yet (only a champion), an unknown model.
    assert registry.promote(model_name, "2") == {"champion": "2"}
    refused = await vitrine("models", "fallback", model_name)
    assert refused.exit_code == 1 and "no version has the alias `fallback`" in refused.output, refused.output
    unknown = await vitrine("models", "fallback", "no_such_model_fb")
    assert unknown.exit_code == 1 and "no registered model 'no_such_model_fb'" in unknown.output, unknown.output
    # Promotion: Triton 2 (registry 1) becomes champion, the previous champion (registry 2 = Triton 1) the fallback.
    promoted = await vitrine("models", "promote", model_name, "1", "--json")
    assert promoted.exit_code == 0 and json.loads(promoted.output)["aliases"] == {"champion": "1", "fallback": "2"}, promoted.output

    # Triton serves only the champion now: the fallback's version must be loaded by the command itself.
    await _serve_only(stack, model_name, [2])
    assert not await _ready(stack, model_name, 1) and await _ready(stack, model_name, 2)

    users = [f"fb-{namespace}-{n}" for n in range(40)]
    vocabulary = json.loads((stack.settings.triton.model_repository / model_name / "2" / "metadata.json").read_text())["vocabulary"]
    await _write_histories(env_settings, vocabulary, users)
    variants = (VariantSettings(name="control", model_name=model_name, model_version="2", weight=60),
                VariantSettings(name="treatment", model_name=model_name, weight=40))
    async with private_gateway(stack.settings, namespace=namespace, default_variants=variants) as settings, \
            GatewayClient(settings.gateway.address, STOREFRONT) as storefront:
        async def on_champion() -> bool | None:
            replies = [await storefront.recommend(u, k=5, timeout_s=5) for u in users[:10]]
            return True if all(r.model_name == model_name and r.model_version == "2" and not r.degraded for r in replies) else None

        await eventually(on_champion, 60, "the gateway to answer from the champion (Triton version 2)")

        # The project's open-loop load generator (loadtest/load_generator.py) at 100 requests/s, the fallback midway.
        served: list[tuple[float, str, str, bool]] = []
        reasons: Counter = Counter()

        async def send(n: int) -> Outcome:
            reply = await storefront.recommend(users[n % len(users)], k=5, timeout_s=DEADLINE_S)
            served.append((time.monotonic(), reply.model_name, reply.model_version, reply.degraded))
            if reply.degraded:
                reasons[reply.degraded_reason] += 1
            return Outcome(degraded=reply.degraded, variant=reply.variant)

        loading = asyncio.create_task(run_load(send, rate=100, duration_s=10, warmup_s=0.5))
        await asyncio.sleep(2.0)
        started = time.monotonic()
        result = await vitrine("models", "fallback", model_name, "--json")
        assert result.exit_code == 0, result.output
        done = json.loads(result.output)
        assert (done["champion_before"], done["champion_after"], done["fallback_after"]) == ("1", "2", "1")
        assert (done["triton_before"], done["triton_after"]) == (2, 1)
        assert done["variants_moved"] == ["control", "treatment"] and done["readiness"].startswith("loaded")
        assert done["aliases"] == {"champion": "2", "fallback": "1"}

        async def on_fallback() -> bool | None:
            recent = [s for s in served if s[0] > time.monotonic() - 0.5]
            return True if len(recent) >= 10 and all(s[2] == "1" for s in recent) else None

        await eventually(on_fallback, 8, "every answer from the fallback (Triton version 1)", interval_s=0.1)
        switched = next(s[0] for s in served if s[0] > started and s[2] == "1") - started
        load = await loading
        print(f"\nfallback under {load.target_rate:.0f} requests/s open-loop: {sum(load.codes.values())} measured, codes "
              f"{dict(load.codes)}, degraded {load.degraded} {dict(reasons)} at {[round(t - started, 2) for t, *_, d in served if d][:3]}…, p99 {np.percentile(load.latencies_s, 99) * 1000:.1f} ms; first "
              f"answer from v1 {switched:.2f} s after the command started; by version {Counter((s[2], s[3]) for s in served)}")
        assert set(load.codes) == {"OK"}  # no failed request
        # Degraded answers are allowed (and counted), but none for want of a model: the only ones seen are feature reads
        # that missed their Redis budget while the CLI process starts on the same 2 cores (~1-2 % of answers).
        assert set(reasons) <= {"redis_unavailable"} and load.degraded <= 0.05 * sum(load.codes.values()), dict(reasons)
        assert served[-1][2] == "1" and {s[2] for s in served if not s[3]} == {"1", "2"}

        # Audited in Redis like any split change; the split itself (weights, salt) is unchanged.
        client = aioredis.Redis(host=settings.redis.host, port=settings.redis.port)
        try:
            entry = (await ExperimentStore(client, namespace).audit(1))[0]
        finally:
            await client.aclose()
        assert entry["by"].startswith("vitrine models fallback")
        assert [(v["model_version"], v["weight"]) for v in entry["old"]["variants"]] == [("2", 60), ("", 40)]
        assert [(v["model_version"], v["weight"]) for v in entry["new"]["variants"]] == [("1", 60), ("1", 40)]
        assert entry["new"]["salt"] == entry["old"]["salt"]

        # The pipeline's champion is the registry's (Triton 1), not the newest version Triton serves (2).
        champions = await asyncio.to_thread(Pipeline(stack.settings)._champions, {"params": {
            "no_champion": False, "repository": str(stack.settings.triton.model_repository), "model_names": {"gru4rec": model_name}}})
        assert (champions["gru4rec"].version, champions["gru4rec"].source) == (1, REGISTRY_SOURCE)

        # Pruning keeps what the aliases and the experiment name, whatever `keep`: a third version with keep=1.
        protected = await protected_versions(settings, registry, model_name)
        assert protected == {1, 2}
        third = await asyncio.to_thread(_export, stack, registry, tiny_run, model_name, logged.run_id, 1, protected)
        assert third == 3
        assert sorted(int(p.name) for p in (stack.settings.triton.model_repository / model_name).iterdir() if p.name.isdigit()) == [1, 2, 3]
        assert all([await _ready(stack, model_name, v) for v in (1, 2, 3)])
        assert (await storefront.recommend(users[0], k=5, timeout_s=5)).model_version == "1"


async def test_a_challenger_failing_its_parity_check_in_triton_is_withdrawn(
        stack: Stack, tiny_run: Path, model_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    repository = stack.settings.triton.model_repository
    first = publish.write_version(tiny_run, repository, model_name, 20, 3)
    await asyncio.to_thread(publish.load_version, first, stack.settings.triton.grpc_url)
    second = publish.write_version(tiny_run, repository, model_name, 20, 3)
    assert (first["version"], second["version"]) == (1, 2)

    async def loaded_then_mismatch(grpc_url: str, model: str, folder: Path, seed: int = 1) -> None:
        await load_and_verify(grpc_url, model, folder, seed)  # really loaded and ready in Triton …
        assert await _ready(stack, model, int(folder.name))
        raise ServingMismatch(f"{model} v{folder.name} batch 7: scores differ (planted)")  # … then found to differ

    monkeypatch.setattr(publish, "load_and_verify", loaded_then_mismatch)
    with pytest.raises(ServingMismatch, match="withdrawn"):
        await asyncio.to_thread(publish.load_version, second, stack.settings.triton.grpc_url)
    assert not (repository / model_name / "2").exists() and (repository / model_name / ".rejected-2" / "model.onnx").is_file()
    assert not await _ready(stack, model_name, 2) and await _ready(stack, model_name, 1)
    # "newest" is the previous version again; a resume of that step says what happened instead of loading nothing.
    client = triton.InferenceServerClient(stack.settings.triton.grpc_url)
    try:
        index = await client.get_model_repository_index(as_json=True)
    finally:
        await client.close()
    assert {m.get("version") for m in index["models"] if m["name"] == model_name and m.get("state") == "READY"} == {"1"}
    with pytest.raises(ServingMismatch, match="not in the repository"):
        await asyncio.to_thread(publish.load_version, second, stack.settings.triton.grpc_url)


async def test_vitrine_export_never_prunes_the_champion(stack: Stack, tiny_run: Path, model_name: str) -> None:
    """`vitrine export --keep 1` keeps the registry's champion however old (and Triton keeps serving it)."""
    env = settings_env(stack.settings)

    async def export() -> None:
        result = await asyncio.to_thread(runner.invoke, app, ["export", str(tiny_run), "--name", model_name, "--no-gate",
                                                               "--keep", "1"], env=env)
        assert result.exit_code == 0, result.output

    await export()
    registry = _registry(stack)
    assert registry.promote(model_name, "1") == {"champion": "1"}
    folder = stack.settings.triton.model_repository / model_name
    on_disk = []
    for _ in range(3):
        await export()
        on_disk.append(sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()))
    # Pruned at each export (before its own version becomes the challenger): the newest, the champion (1) and the
    # challenger of the moment; version 2 goes once it is neither.
    assert on_disk == [[1, 2], [1, 2, 3], [1, 3, 4]]
    assert all([await _ready(stack, model_name, v) for v in (1, 3, 4)]) and not await _ready(stack, model_name, 2)
