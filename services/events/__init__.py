"""The shop's side of the event stream: publishing storefront events to Kafka (demo, tests, load)."""
