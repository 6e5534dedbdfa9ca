"""The event archive: Kafka topics as Parquet files by date and hour, committed with their offsets."""
