"""`Stack`: bring the local stack up in order with health checks, tear it down, report on it.

Failures name the component and quote the end of its log, within `stack.startup_timeout_s`.
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vitrine.services.stack.components import Component, build_all
from vitrine.services.stack.supervisor import RUNNING_STATES, Supervisor
from vitrine.settings import Settings

PROBE_INTERVAL_S = 0.25
Reporter = Callable[[str], None]
FAILED_STATES = frozenset({"FATAL", "EXITED", "BACKOFF", "STOPPED", "UNKNOWN"})


class StackError(RuntimeError):
    """A component could not be started or stopped; the message names it and quotes its log."""

    def __init__(self, component: str, message: str) -> None:
        super().__init__(f"{component}: {message}")
        self.component = component


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    state: str
    pid: int
    healthy: bool
    detail: str
    url: str


def tail(path: Path, lines: int) -> str:
    try:
        with path.open(errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))
    except FileNotFoundError:
        return f"(no log at {path})\n"


FREE_PORT_LOW = 27_000
"""Lowest port `free_port` hands out: above the stack's own ports (default and shifted by up to ~7,000)."""
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A free port for an extra process started beside the stack, one nothing else is likely to take first.

    The OS's own pick (bind to port 0) comes from the ephemeral range, which the kernel also draws from
    for the local end of every outgoing connection (the Kafka, Redis and gRPC clients on this machine)
    and for every other bind to 0: any of them can take that port between this call and the child's
    bind. So the port is drawn at random from [FREE_PORT_LOW, start of the ephemeral range), which
    neither of those uses, is never handed out twice by one process, and is free when returned. Another
    process may still bind it explicitly first: a caller that starts a child on it should start again on
    a new port when the child reports the address in use.
    """
    low, high = FREE_PORT_LOW, _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200) if high - low > 1000 else ():
        port = rng.randrange(low, high)
        if port not in _handed_out and not port_in_use(host, port):
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:  # no room below the ephemeral range
        probe.bind((host, 0))
        return probe.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.supervisor = Supervisor(settings.stack.home, settings.stack.stop_timeout_s)

    def components(self) -> list[Component]:
        return build_all(self.settings)

    async def up(self, report: Reporter = print) -> list[ComponentStatus]:
        """Start whatever is not running yet, in order, each healthy before the next; a no-op on a running stack."""
        components = self.components()
        self.settings.stack.home.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.supervisor.ensure_running, self.supervisor.render(components))
        for component in components:
            await self._up_one(component, report)
        return await self.status()

    async def _up_one(self, component: Component, report: Reporter) -> None:
        info = await asyncio.to_thread(self.supervisor.info, component.name)
        if info is not None and info.state in RUNNING_STATES:
            if await component.probe(self.settings) is None:
                report(f"{component.name}: already running (pid {info.pid})")
                return
        else:
            for label, (host, port) in component.ports.items():
                if port_in_use(host, port):
                    raise StackError(
                        component.name,
                        f"port {port} ({label}) on {host} is already in use by another process; "
                        f"stop that process or configure another port (see vitrine/settings.py)",
                    )
            if component.prepare is not None:
                try:
                    await asyncio.to_thread(component.prepare)
                except Exception as exc:
                    raise StackError(component.name, f"preparation failed: {_describe(exc)}") from exc
            await asyncio.to_thread(self.supervisor.start, component.name)
        started = time.monotonic()
        await self._wait_ready(component)
        if component.after_ready is not None:
            try:
                await component.after_ready()
            except Exception as exc:
                raise StackError(component.name, f"post-start step failed: {_describe(exc)}") from exc
        report(f"{component.name}: healthy in {time.monotonic() - started:.1f}s — {component.url}")

    async def _wait_ready(self, component: Component) -> None:
        deadline = time.monotonic() + self.settings.stack.startup_timeout_s
        reason: str | None = "not probed yet"
        while True:
            info = await asyncio.to_thread(self.supervisor.info, component.name)
            if info is None or info.state in FAILED_STATES:
                state = info.state if info else "UNKNOWN"
                await asyncio.to_thread(self.supervisor.rpc_stop, component.name)
                raise StackError(component.name, f"process {state} while starting; last log lines:\n{self._tail(component)}")
            reason = await component.probe(self.settings)
            if reason is None:
                return
            if time.monotonic() > deadline:
                await asyncio.to_thread(self.supervisor.rpc_stop, component.name)
                raise StackError(
                    component.name,
                    f"not healthy after {self.settings.stack.startup_timeout_s:g}s ({reason}); "
                    f"last log lines:\n{self._tail(component)}",
                )
            await asyncio.sleep(PROBE_INTERVAL_S)

    def _tail(self, component: Component) -> str:
        return tail(self.supervisor.log_file(component.name), self.settings.stack.log_tail_lines)

    async def down(self, report: Reporter = print) -> None:
        """Stop every component in reverse order, then supervisord; afterwards no stack process is left."""
        if await asyncio.to_thread(self.supervisor.pid) is None:
            report("stack is not running")
            return
        for component in reversed(self.components()):
            await asyncio.to_thread(self.supervisor.rpc_stop, component.name)
            report(f"{component.name}: stopped")
        await asyncio.to_thread(self.supervisor.shutdown)
        report("supervisord: stopped")

    async def status(self) -> list[ComponentStatus]:
        running = await asyncio.to_thread(self.supervisor.pid) is not None
        result = []
        for component in self.components():
            info = await asyncio.to_thread(self.supervisor.info, component.name) if running else None
            state, pid = (info.state, info.pid) if info else ("DOWN", 0)
            reason = await component.probe(self.settings) if state in RUNNING_STATES else "not running"
            result.append(ComponentStatus(component.name, state, pid, reason is None, reason or "ok", component.url))
        return result

    def log_path(self, name: str) -> Path:
        names = {c.name for c in self.components()} | {"supervisord"}
        if name not in names:
            raise ValueError(f"unknown component {name!r}; choose one of {', '.join(sorted(names))}")
        return self.supervisor.log_file(name)


def _describe(exc: BaseException) -> str:
    stderr = getattr(exc, "stderr", None)
    return f"{exc}\n{stderr}" if stderr else str(exc)
