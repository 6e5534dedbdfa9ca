"""CPU time per request, per process, during one open-loop run: where a configuration's capacity goes.

On two cores shared by everything, the highest rate a configuration sustains is bounded by the CPU
all processes together spend per request. Measuring that budget per process (from the kernel's
counters via psutil, before and after the run) shows what micro-batching can save (the model
server's per-call cost) and what it cannot (the gateway's own per-request work).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import psutil

from vitrine.loadtest.load_generator import LoadResult
from vitrine.settings import Settings

GENERATOR = "load generator"
SERVER = "server under test"


@dataclass(frozen=True)
class CpuBudget:
    label: str
    requests: int
    ms_per_request: dict[str, float]
    mean_batch: float | None = None
    """Requests per Triton call during the run (gateways only)."""

    @property
    def total_ms(self) -> float:
        return sum(self.ms_per_request.values())


def _group(process: psutil.Process) -> str | None:
    try:
        name, command = process.name(), " ".join(process.cmdline())
    except psutil.Error:
        return None
    if "triton" in name:
        return "Triton (server + python stub)"
    if name.startswith("redis-server"):
        return "Redis"
    if name == "java":
        return "Kafka"
    if "features run" in command:
        return "feature consumer"
    if "gateway run" in command:
        return "stack's own gateway (idle)"
    return "Prometheus, exporter, supervisor"


def stack_processes(settings: Settings) -> dict[str, list[psutil.Process]]:
    """The running stack's processes (supervisord's descendants), grouped by role."""
    supervisor = psutil.Process(int((settings.stack.home / "supervisord.pid").read_text()))
    groups: dict[str, list[psutil.Process]] = {}
    for process in [supervisor, *supervisor.children(recursive=True)]:
        group = _group(process)
        if group is not None:
            groups.setdefault(group, []).append(process)
    return groups


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass  # gone: its share is lost, not fatal
    return total


async def measure(label: str, groups: dict[str, list[psutil.Process]], load: Callable[[], Awaitable[LoadResult]]) -> tuple[CpuBudget, LoadResult]:
    """Run `load` and return the CPU milliseconds each group spent per request sent during it."""
    everything = {**groups, GENERATOR: [psutil.Process()]}
    before = {group: _cpu_seconds(processes) for group, processes in everything.items()}
    result = await load()
    spent = {group: _cpu_seconds(processes) - before[group] for group, processes in everything.items()}
    sent = max(result.launched, 1)  # warm-up included: those requests cost CPU too
    return CpuBudget(label, sent, {group: seconds * 1000 / sent for group, seconds in spent.items()}), result


def render(budgets: list[CpuBudget]) -> str:
    groups = sorted({g for b in budgets for g in b.ms_per_request}, key=lambda g: (g != SERVER, g != GENERATOR, g))
    lines = ["| CPU ms per request | " + " | ".join(b.label for b in budgets) + " |",
             "| --- |" + " ---: |" * len(budgets)]
    for group in groups:
        lines.append(f"| {group} | " + " | ".join(f"{b.ms_per_request.get(group, 0.0):.2f}" for b in budgets) + " |")
    lines.append("| **all processes** | " + " | ".join(f"**{b.total_ms:.2f}**" for b in budgets) + " |")
    lines.append("| requests per Triton call | " + " | ".join("–" if b.mean_batch is None else f"{b.mean_batch:.2f}" for b in budgets) + " |")
    return "\n".join(lines)
