"""The streaming feature consumer: Kafka `events` → validated → real-time features in Redis."""
