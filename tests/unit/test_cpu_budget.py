"""CPU-per-request accounting of a load run (this process stands in for every group)."""

import time
from collections import Counter

import numpy as np
import psutil
import pytest

from vitrine.loadtest import cpu_budget
from vitrine.loadtest.load_generator import LoadResult


@pytest.mark.timeout(30)
async def test_cpu_spent_during_the_run_is_divided_by_every_request_sent() -> None:
    async def busy_load() -> LoadResult:
        end = time.process_time() + 0.2
        while time.process_time() < end:  # 200 ms of CPU in this process
            pass
        return LoadResult(10, 1.0, np.zeros(10), Counter({"OK": 10}), 0, {}, np.zeros(10), np.zeros(10), launched=20)

    budget, _ = await cpu_budget.measure("busy", {"server under test": [psutil.Process()]}, busy_load)
    assert budget.requests == 20
    # 200 ms over 20 requests = 10 ms each, seen by both groups that this process stands in for.
    for group in (cpu_budget.GENERATOR, cpu_budget.SERVER):
        assert 9 <= budget.ms_per_request[group] <= 13, group
    table = cpu_budget.render([budget])
    assert "| server under test |" in table.splitlines()[2] and "**all processes**" in table
