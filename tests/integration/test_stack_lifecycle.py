"""`up`, `up` again, `down`, and a taken port, each on a stack of its own (other ports, other folder)."""

import asyncio
import socket

import psutil
import pytest

from vitrine.services.stack import Stack, StackError
from vitrine.services.stack.launcher import port_in_use
from vitrine.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _tree(pids: list[int]) -> set[int]:
    found = set()
    for pid in pids:
        try:
            process = psutil.Process(pid)
            found |= {pid} | {child.pid for child in process.children(recursive=True)}
        except psutil.NoSuchProcess:
            continue
    return found


def _alive(pids: set[int]) -> list[str]:
    alive = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid} {' '.join(process.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            continue
    return alive


def _all_ports(stack: Stack) -> list[tuple[str, str, int]]:
    return [(c.name, host, port) for c in stack.components() for host, port in c.ports.values()]


def test_up_is_idempotent_and_down_leaves_nothing_running() -> None:
    stack = Stack(Settings().shifted(2000))
    try:
        first = asyncio.run(stack.up(report=lambda line: None))
        assert all(s.healthy for s in first), [s for s in first if not s.healthy]
        supervisor_pid = stack.supervisor.pid()
        assert supervisor_pid is not None
        processes = _tree([supervisor_pid])
        assert {s.pid for s in first} <= processes

        lines: list[str] = []
        second = asyncio.run(stack.up(report=lines.append))
        assert [(s.name, s.pid) for s in second] == [(s.name, s.pid) for s in first]
        assert all("already running" in line for line in lines) and len(lines) == len(first)
        assert stack.supervisor.pid() == supervisor_pid
        processes |= _tree([supervisor_pid])  # Triton's python-backend stubs included
    finally:
        asyncio.run(stack.down(report=lambda line: None))
    assert _alive(processes) == []
    assert [p for p in _all_ports(stack) if port_in_use(p[1], p[2])] == []
    assert all(s.state == "DOWN" and not s.healthy for s in asyncio.run(stack.status()))


def test_a_taken_port_is_reported_with_the_component_name() -> None:
    stack = Stack(Settings().shifted(3000))
    kafka_port = stack.settings.kafka.port
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((stack.settings.kafka.host, kafka_port))
        squatter.listen()
        try:
            with pytest.raises(StackError) as error:
                asyncio.run(stack.up(report=lambda line: None))
        finally:
            asyncio.run(stack.down(report=lambda line: None))
    assert error.value.component == "kafka"
    assert str(error.value).startswith("kafka: ") and str(kafka_port) in str(error.value)
    assert "already in use" in str(error.value)
    assert stack.supervisor.pid() is None
