"""The outcome attribution service: Kafka `recs.served` ⋈ `events` → per-user outcome rows in Redis."""
