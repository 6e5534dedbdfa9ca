"""The trigger service: Alertmanager's webhook (and an optional schedule) start pipeline runs — at most one at a
time, one per alert group notification, none within the debounce interval of the last (docs/pipeline.md)."""
