"""What a pipeline run records, and the one place where a registry plugs in.

Every step writes its status, timings and numbers through a `RunRecorder`. `FileRunRecorder` keeps one
`record.json` per run under `<stack.home>/pipeline/runs/<run_id>/` (written atomically: temp file, fsync,
rename), which is also what `resume`, `reproduce`, `status` and `list` read. An MLflow recorder (runs,
params, metrics, aliases) implements the same protocol; the runner never knows which one it has.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

STEPS: tuple[str, ...] = ("validate", "train", "evaluate", "gate", "export")
"""The steps in order; a resumed run continues from the first one not `succeeded`."""
RunStatus = Literal["running", "succeeded", "rejected", "stopped", "failed"]
"""succeeded: a challenger was exported and loaded; rejected: the gate said no (with the numbers);
stopped: a data check failed; failed: an error (or a crash, once marked)."""
FINAL: frozenset[str] = frozenset({"succeeded", "rejected", "stopped", "failed"})
EXIT_CODES: dict[str, int] = {"succeeded": 0, "failed": 1, "rejected": 3, "stopped": 4}
"""`vitrine pipeline run|resume` exit status by the run's final status (2 is a usage error, as for every command)."""
BUSY_EXIT = 5
"""Another run holds the lock."""
RUN_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}-[0-9a-f]{6}$")
RECORD_FILE = "record.json"


def new_run_id(now: datetime | None = None) -> str:
    """Sortable by start time, unique by a random suffix (two triggers in the same second still differ)."""
    return f"{(now or datetime.now(UTC)):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def check_run_id(run_id: str) -> str:
    """Run ids become folder names: anything else (a path, `..`) is refused."""
    if not RUN_ID_RE.fullmatch(run_id):
        raise ValueError(f"{run_id!r} is not a run id (YYYYMMDDTHHMMSS-xxxxxx)")
    return run_id


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@runtime_checkable
class RunRecorder(Protocol):
    """Where a run's record goes. The runner calls these, in this order, and nothing else."""

    def start(self, run_id: str, trigger: str, params: dict[str, Any], cause: str = "") -> dict[str, Any]:
        """Create the record of a new run (status running, with what started it) and return it."""

    def load(self, run_id: str) -> dict[str, Any]:
        """The record of an existing run (KeyError when there is none)."""

    def step(self, run_id: str, step: str, status: str, **fields: Any) -> None:
        """Update one step: status (running/succeeded/failed/skipped/stopped/rejected), timings and numbers."""

    def finish(self, run_id: str, status: str, reason: str = "", **fields: Any) -> None:
        """Mark the run final."""

    def update(self, run_id: str, **fields: Any) -> None:
        """Top-level fields (e.g. the pid of a resumed run)."""

    def runs(self) -> list[dict[str, Any]]:
        """Every run's record, oldest first."""

    def artefacts(self, run_id: str) -> Path:
        """A folder for the run's files (trained run folders, reports)."""


class FileRunRecorder:
    """`record.json` per run, replaced atomically on every change (a crash leaves the previous complete version)."""

    def __init__(self, home: Path) -> None:
        self.root = home / "runs"

    def _path(self, run_id: str) -> Path:
        return self.root / check_run_id(run_id) / RECORD_FILE

    def _write(self, record: dict[str, Any]) -> None:
        path = self._path(record["run_id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(".json.tmp")
        with temp.open("w") as out:
            json.dump(record, out, indent=2, default=str)
            out.flush()
            os.fsync(out.fileno())
        temp.replace(path)

    def start(self, run_id: str, trigger: str, params: dict[str, Any], cause: str = "") -> dict[str, Any]:
        if self._path(run_id).exists():
            raise FileExistsError(f"run {run_id} exists")
        record = {"run_id": run_id, "trigger": trigger, "cause": cause, "status": "running", "reason": "", "pid": os.getpid(),
                  "started_at": now_iso(), "finished_at": None, "params": params,
                  "steps": {name: {"status": "pending"} for name in STEPS}}
        self._write(record)
        return record

    def load(self, run_id: str) -> dict[str, Any]:
        path = self._path(run_id)
        if not path.is_file():
            raise KeyError(f"no pipeline run {run_id} in {self.root}")
        return json.loads(path.read_text())

    def step(self, run_id: str, step: str, status: str, **fields: Any) -> None:
        record = self.load(run_id)
        entry = record["steps"].setdefault(step, {})
        if status == "running" and entry.get("status") != "running":  # a step (re)starts; later "running" calls add numbers
            entry.clear()
            entry["started_at"] = now_iso()
            entry["_t0"] = datetime.now(UTC).timestamp()
        elif "_t0" in entry:
            entry["finished_at"] = now_iso()
            entry["duration_s"] = round(datetime.now(UTC).timestamp() - entry.pop("_t0"), 3)
        entry["status"] = status
        entry.update(fields)
        self._write(record)

    def finish(self, run_id: str, status: str, reason: str = "", **fields: Any) -> None:
        record = self.load(run_id)
        record.update(status=status, reason=reason, finished_at=now_iso(), **fields)
        self._write(record)

    def update(self, run_id: str, **fields: Any) -> None:
        record = self.load(run_id)
        record.update(fields)
        self._write(record)

    def runs(self) -> list[dict[str, Any]]:
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(self.root.glob(f"*/{RECORD_FILE}")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # a record being replaced right now: the rename is atomic, so this is a foreign file
        return out

    def artefacts(self, run_id: str) -> Path:
        folder = self._path(run_id).parent
        folder.mkdir(parents=True, exist_ok=True)
        return folder
