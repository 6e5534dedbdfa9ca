"""supervisord as the stack's process manager: it daemonises, captures each component's output into one
log file, kills whole process groups (Triton's python-backend stubs included) and restarts a crashed
component. Vitrine writes its config and drives it over XML-RPC on a unix socket in the stack folder.
"""

from __future__ import annotations

import configparser
import io
import os
import shlex
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from vitrine.services.stack.components import Component

RUNNING_STATES = frozenset({"STARTING", "RUNNING"})


@dataclass(frozen=True)
class ProcessInfo:
    name: str
    state: str
    pid: int
    description: str


def _quote_env(env: dict[str, str]) -> str:
    """supervisord reads `environment` with POSIX shell quoting (values may hold JSON, commas, quotes)."""
    return ",".join(f"{key}={shlex.quote(value)}" for key, value in env.items())


class Supervisor:
    def __init__(self, home: Path, stop_timeout_s: float) -> None:
        self.home = home
        self.logs = home / "logs"
        self.conf = home / "supervisord.conf"
        self.socket = home / "supervisor.sock"
        self.pidfile = home / "supervisord.pid"
        self.stop_timeout_s = stop_timeout_s

    def log_file(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def render(self, components: list[Component]) -> str:
        """supervisord.conf for these components; none autostarts, because `Stack.up` starts them in order."""
        parser = configparser.RawConfigParser()
        parser["unix_http_server"] = {"file": str(self.socket), "chmod": "0700"}
        parser["supervisord"] = {
            "logfile": str(self.log_file("supervisord")),
            "pidfile": str(self.pidfile),
            "directory": str(self.home),
            "childlogdir": str(self.logs),
            "identifier": f"vitrine:{self.home}",
        }
        parser["rpcinterface:supervisor"] = {
            "supervisor.rpcinterface_factory": "supervisor.rpcinterface:make_main_rpcinterface"
        }
        parser["supervisorctl"] = {"serverurl": f"unix://{self.socket}"}
        for order, component in enumerate(components):
            section = {
                "priority": str(100 + 10 * order),
                # supervisord expands %(...)s in its config, so literal percent signs are doubled.
                "command": shlex.join(component.command).replace("%", "%%"),
                "autostart": "false",
                "autorestart": "unexpected",
                "startsecs": "1",
                "startretries": "2",
                "stopsignal": "TERM",
                "stopwaitsecs": str(int(self.stop_timeout_s)),
                "stopasgroup": "true",
                "killasgroup": "true",
                "redirect_stderr": "true",
                "stdout_logfile": str(self.log_file(component.name)),
                "stdout_logfile_maxbytes": "50MB",
                "stdout_logfile_backups": "2",
            }
            if component.env:
                section["environment"] = _quote_env(component.env).replace("%", "%%")
            parser[f"program:{component.name}"] = section
        out = io.StringIO()
        out.write("; Written by `vitrine stack up`; edits are overwritten.\n")
        parser.write(out)
        return out.getvalue()

    def _rpc(self) -> Any:
        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://localhost", transport=transport).supervisor

    def pid(self) -> int | None:
        """supervisord's pid if it is alive and answering on its socket."""
        try:
            return int(self._rpc().getPID())
        except (OSError, xmlrpc.client.Fault, ValueError):
            return None

    def ensure_running(self, config: str) -> bool:
        """Start supervisord with `config`, or reload it if the config changed. True when it was started."""
        self.logs.mkdir(parents=True, exist_ok=True)
        changed = not self.conf.exists() or self.conf.read_text() != config
        if changed:
            self.conf.write_text(config)
        if self.pid() is not None:
            if changed:
                added, changed_names, removed = self._rpc().reloadConfig()[0]
                for name in added:
                    self._rpc().addProcessGroup(name)
                for name in changed_names + removed:
                    self.rpc_stop(name)
                    self._rpc().removeProcessGroup(name)
                    if name in changed_names:
                        self._rpc().addProcessGroup(name)
            return False
        self.socket.unlink(missing_ok=True)
        subprocess.run(
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(self.conf)],
            check=True, cwd=self.home, capture_output=True, text=True, timeout=30,
        )
        deadline = time.monotonic() + 15
        while self.pid() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"supervisord did not come up; see {self.log_file('supervisord')}")
            time.sleep(0.05)
        return True

    def info(self, name: str) -> ProcessInfo | None:
        try:
            raw = self._rpc().getProcessInfo(name)
        except (OSError, xmlrpc.client.Fault):
            return None
        return ProcessInfo(name=name, state=raw["statename"], pid=raw["pid"], description=raw["description"])

    def start(self, name: str) -> None:
        """Ask supervisord to start `name` without waiting: readiness is judged by the component's probe."""
        self._rpc().startProcess(name, False)

    def rpc_stop(self, name: str) -> None:
        try:
            self._rpc().stopProcess(name, True)
        except xmlrpc.client.Fault as fault:
            if "NOT_RUNNING" not in fault.faultString and "BAD_NAME" not in fault.faultString:
                raise

    def shutdown(self) -> None:
        """Stop every component (in reverse start order) and supervisord itself, and wait until it is gone."""
        pid = self.pid()
        if pid is None:
            return
        self._rpc().shutdown()
        deadline = time.monotonic() + self.stop_timeout_s * 2 + 10
        while _alive(pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"supervisord (pid {pid}) did not exit; see {self.log_file('supervisord')}")
            time.sleep(0.1)
        self.socket.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it has exited all the same.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True
