"""The local stack: real Redis, Kafka, Triton and Prometheus (and later Vitrine's services) under supervisord.

`vitrine stack up | down | status | logs` and the integration-test fixtures both go through `Stack`.
"""

from vitrine.services.stack.launcher import ComponentStatus, Stack, StackError

__all__ = ["ComponentStatus", "Stack", "StackError"]
