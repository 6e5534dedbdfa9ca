import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import UnknownTopicOrPartitionError

from tests.integration.invariants import assert_exactly_once
from vitrine.contracts import topics
from vitrine.services.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]
MESSAGES = 300


@pytest.fixture
async def admin(stack: Stack):
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.settings.kafka.bootstrap_servers)
    await admin.start()
    yield admin
    await admin.close()


@pytest.mark.asyncio
async def test_vitrine_topics_exist_with_the_configured_partitions(admin: AIOKafkaAdminClient, stack: Stack) -> None:
    described = {t["topic"]: t for t in await admin.describe_topics(list(topics.ALL))}
    for name in topics.ALL:
        assert described[name]["error_code"] == 0, f"topic {name} missing"
        assert len(described[name]["partitions"]) == stack.settings.kafka.partitions


@pytest.mark.asyncio
async def test_consumer_group_reads_every_message_once_and_resumes_from_its_commit(
    admin: AIOKafkaAdminClient, stack: Stack
) -> None:
    bootstrap = stack.settings.kafka.bootstrap_servers
    topic, group = f"test-{uuid.uuid4().hex[:8]}", f"group-{uuid.uuid4().hex[:8]}"
    await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        sends = [await producer.send(topic, key=f"user-{i % 17}".encode(), value=str(i).encode()) for i in range(MESSAGES)]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    seen: list[str] = []
    try:
        while len(seen) < MESSAGES:
            batch = await consumer.getmany(timeout_ms=1000)
            seen += [m.value.decode() for records in batch.values() for m in records]
        await consumer.commit()
    finally:
        await consumer.stop()
    assert_exactly_once(seen, [str(i) for i in range(MESSAGES)])

    # The same group again: it resumes at the committed offsets, which sit at the end of every partition.
    again = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await again.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(3)]
        ends = await again.end_offsets(partitions)
        committed = {tp: await again.committed(tp) for tp in partitions}
        assert committed == ends and sum(ends.values()) == MESSAGES
        while not again.assignment():  # the group join, awaited as an event rather than a timed poll
            await again.getmany(timeout_ms=100)
        assert {tp: await again.position(tp) for tp in again.assignment()} == ends
    finally:
        await again.stop()


@pytest.mark.asyncio
async def test_topics_are_not_created_by_accident(admin: AIOKafkaAdminClient, stack: Stack) -> None:
    """A producer asking for (and writing to) a misspelt topic gets UnknownTopicOrPartition, and afterwards
    the broker still does not know the topic: auto-creation is off."""
    typo = f"typo-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka.bootstrap_servers, request_timeout_ms=3000)
    await producer.start()
    try:
        with pytest.raises(UnknownTopicOrPartitionError):  # aiokafka waits request_timeout_ms for metadata
            await asyncio.wait_for(producer.partitions_for(typo), 10)
        with pytest.raises(UnknownTopicOrPartitionError):
            await asyncio.wait_for(producer.send_and_wait(typo, b"lost?"), 10)
    finally:
        await producer.stop()
    [described] = await admin.describe_topics([typo])
    assert (described["topic"], described["error_code"]) == (typo, UnknownTopicOrPartitionError.errno)
