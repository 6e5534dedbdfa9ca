"""Reading Kafka the way the services' tests check them: a group's committed offsets, and one poll's records."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition


async def kafka_committed(bootstrap_servers: str, group_id: str, topic: str, partitions: int) -> int:
    """The group's committed offsets in Kafka for `topic`, summed over its partitions (0 where none)."""
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=group_id, enable_auto_commit=False)
    await reader.start()
    try:
        return sum([await reader.committed(TopicPartition(topic, p)) or 0 for p in range(partitions)])
    finally:
        await reader.stop()


async def polled(consumer: AIOKafkaConsumer, timeout_ms: int) -> list[ConsumerRecord]:
    """The records of one `getmany`, all partitions flattened."""
    return [message for messages in (await consumer.getmany(timeout_ms=timeout_ms)).values() for message in messages]
