"""Only one pipeline runs at a time: an exclusive `fcntl.flock` on `<stack.home>/pipeline/lock`.

Why flock and not a pid file: the kernel releases a flock when the process that holds it dies, however it
dies (SIGKILL, OOM), so a crash never leaves a stale lock and nobody has to guess whether a pid was reused.
The file's content (pid, run id, start time) is only for people and `status`; the lock is the flock itself.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from types import TracebackType

from vitrine.export.pipeline.record import now_iso

LOCK_FILE = "lock"


class PipelineBusy(RuntimeError):
    """Another pipeline run holds the lock."""

    def __init__(self, holder: dict) -> None:
        super().__init__(f"another pipeline run holds the lock: {holder or 'unknown holder'}")
        self.holder = holder


class PipelineLock:
    """`with PipelineLock(home, run_id):` — raises PipelineBusy at once instead of waiting."""

    def __init__(self, home: Path, run_id: str = "") -> None:
        self.path = home / LOCK_FILE
        self.run_id = run_id
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PipelineBusy(holder(self.path.parent)) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "run_id": self.run_id, "since": now_iso()}).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> PipelineLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def is_locked(home: Path) -> bool:
    """Whether some process holds the lock now (a probe: takes and drops it when free)."""
    path = home / LOCK_FILE
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock this probe took
    return False


def holder(home: Path) -> dict:
    """What the lock file says about its holder (informational; may be stale when nobody holds the flock)."""
    try:
        return json.loads((home / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}
