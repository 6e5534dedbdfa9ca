"""The trigger service's state: which notifications already started a run and when the last run started.

Kept in one JSON file (replaced atomically) so that a restarted service still knows a repeated notification
and still debounces. `decide` is pure (state + time in, decision out) so that tests need no server.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Decision = Literal["start", "duplicate", "debounced", "busy"]


@dataclass
class TriggerState:
    path: Path | None
    debounce_s: float
    dedupe_ttl_s: float
    seen: dict[str, float] = field(default_factory=dict)
    """Notification key → when it started a run (epoch seconds)."""
    last_start: float | None = None
    last_run_id: str = ""

    @classmethod
    def open(cls, path: Path | None, debounce_s: float, dedupe_ttl_s: float) -> TriggerState:
        state = cls(path, debounce_s, dedupe_ttl_s)
        if path is not None and path.is_file():
            raw = json.loads(path.read_text())
            state.seen = {str(k): float(v) for k, v in raw.get("seen", {}).items()}
            state.last_start = raw.get("last_start")
            state.last_run_id = raw.get("last_run_id", "")
        return state

    def decide(self, key: str | None, busy: bool, now: float) -> Decision:
        """Duplicate first (a repeat is a repeat even while its run is still going), then busy, then debounced."""
        self.seen = {k: t for k, t in self.seen.items() if now - t < self.dedupe_ttl_s}
        if key is not None and key in self.seen:
            return "duplicate"
        if busy:
            return "busy"
        if self.last_start is not None and now - self.last_start < self.debounce_s:
            return "debounced"
        return "start"

    def started(self, key: str | None, run_id: str, now: float) -> None:
        if key is not None:
            self.seen[key] = now
        self.last_start, self.last_run_id = now, run_id
        self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_suffix(".tmp")
        temp.write_text(json.dumps({"seen": self.seen, "last_start": self.last_start, "last_run_id": self.last_run_id}))
        os.replace(temp, self.path)
