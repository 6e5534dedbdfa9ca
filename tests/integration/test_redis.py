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
