"""The archive consumer's Prometheus metrics: names, labels and buckets are defined here and only here.

Labels are bounded: table (`events`, `exposures`), reason, step, topic and partition.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

RECORDS_CONSUMED: Final = "vitrine_archive_records_consumed_total"
ROWS_WRITTEN: Final = "vitrine_archive_rows_written_total"
FILES_WRITTEN: Final = "vitrine_archive_files_written_total"
BYTES_WRITTEN: Final = "vitrine_archive_written_bytes_total"
REJECTED: Final = "vitrine_archive_records_rejected_total"
COMPACTIONS: Final = "vitrine_archive_compactions_total"
FILES_COMPACTED: Final = "vitrine_archive_compacted_files_total"
RECOVERED: Final = "vitrine_archive_recovered_files_total"
BUFFERED_ROWS: Final = "vitrine_archive_buffered_rows"
OLDEST_BUFFERED: Final = "vitrine_archive_oldest_buffered_age_seconds"
FLUSH_DURATION: Final = "vitrine_archive_flush_duration_seconds"
COMPACTION_DURATION: Final = "vitrine_archive_compaction_duration_seconds"
BATCH_SIZE: Final = "vitrine_archive_batch_size_records"
BATCH_DURATION: Final = "vitrine_archive_batch_duration_seconds"
CONSUMER_LAG: Final = "vitrine_archive_consumer_lag_messages"
ASSIGNED_PARTITIONS: Final = "vitrine_archive_assigned_partitions"
WRITE_RETRIES: Final = "vitrine_archive_write_retries_total"
OFFSET_REWINDS: Final = "vitrine_archive_offset_rewinds_total"
DLQ_SPILLED: Final = "vitrine_archive_dlq_spilled_total"

BATCH_SIZE_BUCKETS: Final = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000)
DURATION_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ArchiveMetrics:
    """One set of the consumer's metrics, registered in `registry` (a fresh one in tests)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name.removesuffix("_total"), doc, labels, registry=registry)

        self.consumed = counter(RECORDS_CONSUMED, "Kafka records read, by table.", ("table",))
        self.rows_written = counter(ROWS_WRITTEN, "Rows committed to the archive by flushes (compaction rewrites are not counted).", ("table",))
        self.files_written = counter(FILES_WRITTEN, "Parquet files committed, by step (flush or compaction).", ("table", "step"))
        self.bytes_written = counter(BYTES_WRITTEN, "Bytes of Parquet written, by step (flush or compaction).", ("table", "step"))
        self.rejected = counter(REJECTED, "Records that fail their contract, sent to the DLQ instead of the archive.", ("reason",))
        self.compactions = counter(COMPACTIONS, "Hour folders' files of one partition merged into one.", ("table",))
        self.files_compacted = counter(FILES_COMPACTED, "Small files merged by compaction into a larger one (deleted after the retention).", ("table",))
        self.recovered = counter(
            RECOVERED, "Files put right on partition assignment after a crash, by action (rolled_forward, temp_removed, shadowed_removed).",
            ("action",))
        self.write_retries = counter(WRITE_RETRIES, "Disk writes or DLQ sends retried after a failure.")
        self.offset_rewinds = counter(
            OFFSET_REWINDS, "Partitions sought back because the stored offset differed from this consumer's (another writer).")
        self.dlq_spilled = counter(DLQ_SPILLED, "Rejected records the DLQ would not take, written to the local spill file instead.", ("reason",))
        self.buffered_rows = Gauge(BUFFERED_ROWS, "Rows read but not yet committed to a file.", registry=registry)
        self.oldest_buffered = Gauge(OLDEST_BUFFERED, "Age of the oldest buffered record (how far the archive trails the topic).", registry=registry)
        self.flush_duration = Histogram(FLUSH_DURATION, "Time to stage, commit and publish one partition's flush.",
                                        buckets=DURATION_BUCKETS, registry=registry)
        self.compaction_duration = Histogram(COMPACTION_DURATION, "Time to merge one hour folder's files of one partition.",
                                             buckets=DURATION_BUCKETS, registry=registry)
        self.batch_size = Histogram(BATCH_SIZE, "Records per polled batch.", buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.batch_duration = Histogram(BATCH_DURATION, "Time to parse, dead-letter, buffer (and flush when due) one batch.",
                                        buckets=DURATION_BUCKETS, registry=registry)
        self.lag = Gauge(CONSUMER_LAG, "High watermark minus the next offset committed to the archive.", ("topic", "partition"), registry=registry)
        self.assigned = Gauge(ASSIGNED_PARTITIONS, "Partitions (of both topics) this consumer owns right now.", registry=registry)
