"""`vitrine bench gateway` end to end on the real stack, with tiny rates: the plumbing, not the figures.

The SLO is set far above what any healthy run takes, so every step must pass and each ramp must stop
exactly at the cap; what is asserted is that all three servers were really measured, the experiment
is put back, and the helper processes are gone.
"""

from __future__ import annotations

import psutil
import pytest

from vitrine.loadtest.serving_bench import bench, render
from vitrine.services.gateway.client import GatewayClient
from vitrine.services.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
EXPERIMENTER = "vitrine-demo-experimenter"


def _bench_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


async def test_bench_measures_all_three_servers_and_restores_the_experiment(stack: Stack) -> None:
    settings = stack.settings
    async with GatewayClient(settings.gateway.address, EXPERIMENTER) as admin:
        before = await admin.get_experiment()
    lines: list[str] = []
    results = await bench(settings, rates=[20], duration_s=1, slo_ms=2000, start_rate=20, report=lines.append,
                          repeats=1, max_rate=30, settle_timeout_s=2)
    row = results["comparison"][0]
    assert row["gateway"]["runs"][0]["sent"] == 20 and row["direct_triton"]["runs"][0]["sent"] == 20
    assert row["gateway"]["runs"][0]["errors"] == {} and row["p50_ratio"] > 0
    capacity = results["capacity"]
    assert set(capacity) == {"batching on", "batching off", "plain baseline"}
    for label, ramp in capacity.items():
        # 20/s then 30/s meet a 2 s SLO; 45/s is beyond the cap, so each ramp ends at 30 exactly.
        assert [s["rate"] for s in ramp["steps"]] == [20, 30], label
        assert ramp["highest_rate"] == 30 and not ramp["client_bound"], label
    steady = results["at_70_percent"]
    assert steady["target_rate"] == pytest.approx(21) and steady["errors"] == {}
    budgets = {b["label"]: b for b in results["cpu_budget"]["by_configuration"]}
    assert list(budgets) == ["direct Triton", "gateway, batching on", "gateway, batching off", "plain server"]
    assert budgets["direct Triton"]["ms_per_request"]["Triton (server + python stub)"] > 0
    for label in ("gateway, batching on", "gateway, batching off", "plain server"):
        assert budgets[label]["ms_per_request"]["server under test"] > 0, label
        assert budgets[label]["requests"] == 27 + 27  # 1 s of warm-up and 1 s measured at 90 % of the lowest capacity
    assert budgets["gateway, batching off"]["mean_batch"] == 1.0
    assert 1.0 <= budgets["gateway, batching on"]["mean_batch"] <= 2.0
    assert budgets["plain server"]["mean_batch"] is None
    table = render({k: v for k, v in results.items() if not k.startswith("_")})
    assert "CPU spent per request" in table
    assert "| batching on ÷ off | 1.00× |" in table
    async with GatewayClient(settings.gateway.address, EXPERIMENTER) as admin:
        after = await admin.get_experiment()
    assert [(v.name, v.weight) for v in after.variants] == [(v.name, v.weight) for v in before.variants]
    assert not _bench_children(), "the bench left gateway or baseline processes running"
