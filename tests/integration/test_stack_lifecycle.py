"""`up`, `up` again, `down`, and a taken port, each on a stack of its own (other ports, other folder)."""

import asyncio
import socket
import time

import psutil
import pytest

from vitrine.services.stack import Stack, StackError
from vitrine.services.stack.components import Component
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


class _OwnComponents(Stack):
    """A stack whose only component is the test's: supervisord and the launcher's waits are the real ones."""

    def __init__(self, settings: Settings, component: Component) -> None:
        super().__init__(settings)
        self.component = component

    def components(self) -> list[Component]:
        return [self.component]


async def _never_ready(settings: Settings) -> str | None:
    return "this probe never passes"


def _own_stack(tmp_path, timeout_s: float) -> Settings:  # noqa: ANN001
    base = Settings().shifted(7000)
    return base.model_copy(update={"stack": base.stack.model_copy(update={"home": tmp_path / "stack", "startup_timeout_s": timeout_s})})


def test_a_component_that_never_turns_healthy_is_named_after_the_start_up_timeout(tmp_path) -> None:  # noqa: ANN001
    settings = _own_stack(tmp_path, timeout_s=3)
    stack = _OwnComponents(settings, Component("sleeper", ["sleep", "600"], {}, _never_ready, "-"))
    try:
        started = time.monotonic()
        with pytest.raises(StackError) as failed:
            asyncio.run(stack.up(report=lambda line: None))
        assert failed.value.component == "sleeper" and "not healthy after 3s" in str(failed.value)
        assert "this probe never passes" in str(failed.value)
        assert time.monotonic() - started >= 3
    finally:
        asyncio.run(stack.down(report=lambda line: None))


def test_a_component_that_exits_at_once_is_reported_with_its_log_without_waiting_for_the_timeout(tmp_path) -> None:  # noqa: ANN001
    settings = _own_stack(tmp_path, timeout_s=600)
    crash = Component("crasher", ["sh", "-c", "echo 'boom: bad flag' >&2; exit 3"], {}, _never_ready, "-")
    stack = _OwnComponents(settings, crash)
    try:
        started = time.monotonic()
        with pytest.raises(StackError) as failed:
            asyncio.run(stack.up(report=lambda line: None))
        assert failed.value.component == "crasher" and "boom: bad flag" in str(failed.value)
        assert time.monotonic() - started < 120  # supervisord gives up after its retries, long before 600 s
    finally:
        asyncio.run(stack.down(report=lambda line: None))
