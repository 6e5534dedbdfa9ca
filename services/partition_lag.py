"""Lag gauges of the partitions a consumer group member owns — and only those it owns.

A member that keeps exporting the lag of partitions it gave away in a rebalance shows a frozen,
wrong figure beside the new owner's: the series must go when the partition goes. Shared by the
feature consumer and the outcome service.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import Gauge


class PartitionLag:
    def __init__(self, lag: Gauge, assigned: Gauge) -> None:
        """`lag` is labelled (topic, partition); `assigned` counts the partitions owned."""
        self.lag = lag
        self.assigned = assigned

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Partitions no longer owned: their series stop being exported."""
        for tp in partitions:
            try:
                self.lag.remove(tp.topic, str(tp.partition))
            except KeyError:
                pass  # never exported

    def update(self, consumer: AIOKafkaConsumer, processed: Mapping[TopicPartition, int]) -> None:
        """High watermark minus the next offset to process, for every owned partition both are known of."""
        assignment = consumer.assignment()
        self.assigned.set(len(assignment))
        for tp in assignment:
            high, position = consumer.highwater(tp), processed.get(tp)
            if high is not None and position is not None:
                self.lag.labels(tp.topic, str(tp.partition)).set(max(0, high - position))
