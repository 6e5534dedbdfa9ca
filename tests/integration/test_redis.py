import uuid

import pytest
import redis.asyncio as aioredis

from vitrine.services.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
async def client(stack: Stack):
    client = aioredis.Redis.from_url(stack.settings.redis.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.mark.asyncio
async def test_round_trip_through_a_pipeline(client: aioredis.Redis) -> None:
    key = f"test:{uuid.uuid4()}"
    async with client.pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping={"a": "1", "b": "two"}).hincrby(key, "a", 41).expire(key, 60)
        await pipe.execute()
    assert await client.hgetall(key) == {"a": "42", "b": "two"}
    assert 0 < await client.ttl(key) <= 60


@pytest.mark.asyncio
async def test_runs_with_append_only_file_and_its_own_data_dir(client: aioredis.Redis, stack: Stack) -> None:
    config = await client.config_get("*")
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == stack.settings.redis.appendfsync
    assert config["dir"] == str(stack.settings.stack.home / "redis")
    assert int(config["port"]) == stack.settings.redis.port


@pytest.mark.asyncio
async def test_the_stack_redis_cannot_evict_exactly_once_state_and_the_consumers_check_accepts_it(stack: Stack) -> None:
    """`stack up` runs Redis with noeviction (its 1 GB cap kept); the consumers' start-up check, on the same client type
    they use (bytes replies), accepts it — and refuses the same Redis once an evicting policy is set."""
    from vitrine.services.member import eviction_risk, require_no_eviction

    raw = aioredis.Redis.from_url(stack.settings.redis.url)  # as the consumers make it: no decode_responses
    try:
        policy = (await raw.config_get("maxmemory-policy"))
        maxmemory = await raw.config_get("maxmemory")
        assert {_text(k): _text(v) for k, v in policy.items()} == {"maxmemory-policy": "noeviction"}
        assert int(_text(next(iter(maxmemory.values())))) > 0  # the cap stays: a full Redis refuses writes instead
        assert eviction_risk("noeviction", 1 << 30) is None
        await require_no_eviction(raw)
        await raw.config_set("maxmemory-policy", "volatile-lru")
        try:
            with pytest.raises(RuntimeError, match="noeviction"):
                await require_no_eviction(raw)
        finally:
            await raw.config_set("maxmemory-policy", "noeviction")
    finally:
        await raw.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def test_an_experiment_stored_under_older_rules_is_replaced_not_fatal(client: aioredis.Redis) -> None:
    """A name with the store's separator, written before names were validated, must not keep a gateway from starting."""
    import json

    from vitrine.services.gateway.experiment import ExperimentStore
    from vitrine.settings import VariantSettings

    store = ExperimentStore(client, f"t{uuid.uuid4().hex[:8]}")
    bad = {"name": "spring\x1fsale", "salt": "s", "revision": 4, "mode": "ab",
           "variants": [{"name": "control", "model_name": "popularity", "model_version": "", "weight": 100}]}
    await client.set(store.key, json.dumps(bad))
    current = await store.seed((VariantSettings(name="control", model_name="popularity", weight=100),))
    assert current.name == "default" and current.revision == 5
    assert (await store.load()) == current
    audit = await store.audit()
    assert audit[0]["old"]["name"] == "spring\x1fsale" and audit[0]["new"]["revision"] == 5
    await client.delete(store.key, store.audit_key)
