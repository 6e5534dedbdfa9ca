"""A pipeline run killed mid-training (SIGKILL, no cleanup) frees the lock, shows as crashed and resumes from
its first unfinished step with its recorded window and fingerprint. No service is needed: without a champion
and against every baseline a one-epoch candidate is rejected before the export step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.pipeline_data import recent, write_archive
from vitrine.export.pipeline.lock import is_locked
from vitrine.export.pipeline.runner import Pipeline
from vitrine.services.stack.components import settings_env
from vitrine.settings import Settings


def test_a_run_killed_while_training_is_resumed_from_the_train_step(tmp_path: Path) -> None:
    write_archive(tmp_path / "archive", recent("small"))
    settings = Settings(stack={"home": tmp_path / "home"}, archive={"root": tmp_path / "archive"},
                        pipeline={"models": ["gru4rec"], "epochs": 3, "threads": 1, "min_events": 100, "window_days": 30,
                                  "max_empty_hour_share": 1.0, "category_preset": "small"})
    child = subprocess.Popen([sys.executable, "-m", "vitrine", "pipeline", "run", "--no-champion"],
                             env={**os.environ, **settings_env(settings)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = settings.pipeline_home / "runs"
    deadline = time.monotonic() + 120
    record = None
    while time.monotonic() < deadline and child.poll() is None:
        files = list(runs.glob("*/record.json")) if runs.is_dir() else []
        record = json.loads(files[0].read_text()) if files else None
        if record and record["steps"]["train"]["status"] == "running":
            break
        time.sleep(0.02)
    assert record and record["steps"]["train"]["status"] == "running", "the run never reached training"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not is_locked(settings.pipeline_home)  # the kernel dropped the flock with the process
    run_id = record["run_id"]
    validated_at = record["steps"]["validate"]["started_at"]

    lines: list[str] = []
    final = Pipeline(settings, report=lines.append).resume(run_id)
    assert lines[0] == f"resuming {run_id} at step train"
    assert final["status"] == "rejected" and final["resumed_at"]
    assert final["steps"]["validate"]["started_at"] == validated_at  # not run again
    assert final["steps"]["train"]["status"] == "succeeded" and final["steps"]["gate"]["status"] == "rejected"
    assert final["steps"]["export"]["status"] == "pending"
