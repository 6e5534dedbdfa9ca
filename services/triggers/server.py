"""HTTP server of the trigger service (aiohttp): POST /alerts, GET /healthz, GET /metrics, and the schedule.

The event loop never waits on a pipeline: a run is a child process (`vitrine pipeline run --trigger drift
--run-id …`) started with `asyncio.create_subprocess_exec` and reaped by a task; file work (state, the lock
probe) goes through `asyncio.to_thread`. One `asyncio.Lock` orders decisions, so that two copies of a
notification posted at the same moment start one run: the second sees the first's key (duplicate) or its
child (busy). The pipeline's own flock is the last guard against a run started elsewhere (CLI, another host
process).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import sys
import time
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError

from vitrine.export.pipeline.lock import is_locked
from vitrine.export.pipeline.record import EXIT_CODES, new_run_id
from vitrine.services.triggers.metrics import TriggerMetrics
from vitrine.services.triggers.store import TriggerState
from vitrine.services.triggers.webhook import Notification, describe, notification_key
from vitrine.settings import Settings

log = logging.getLogger("vitrine.triggers")
OUTCOMES = {code: status for status, code in EXIT_CODES.items()}
STATE_FILE = "state.json"


def read_token(path: Path) -> bytes:
    """The bearer token, stripped; an empty or missing file is a configuration error (the service refuses to start)."""
    if not path.is_file():
        raise FileNotFoundError(f"no token file at {path} (settings triggers.token_file)")
    token = path.read_bytes().strip()
    if len(token) < 16:
        raise ValueError(f"the token in {path} is shorter than 16 bytes")
    return token


def authorised(header: str | None, token: bytes) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header.removeprefix("Bearer ").strip().encode(), token)


class TriggerService:
    def __init__(self, settings: Settings, token: bytes, registry: CollectorRegistry | None = None,
                 command: list[str] | None = None) -> None:
        self.settings = settings
        self.cfg = settings.triggers
        self.token = token
        self.registry = registry or CollectorRegistry()
        self.metrics = TriggerMetrics(self.registry)
        self.home = settings.pipeline_home
        self.state = TriggerState.open(settings.stack.home / "triggers" / STATE_FILE, self.cfg.debounce_s, self.cfg.dedupe_ttl_s)
        self.command = command or [sys.executable, "-m", "vitrine", "pipeline", "run"]
        self._decide = asyncio.Lock()
        self._child: asyncio.subprocess.Process | None = None
        self._tasks: set[asyncio.Task] = set()

    # --- HTTP ---------------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes)
        app.router.add_post("/alerts", self.alerts)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics_page)
        return app

    def _refuse(self, reason: str, status: int, body: dict) -> web.Response:
        self.metrics.rejected.labels(reason).inc()
        headers = {"WWW-Authenticate": 'Bearer realm="vitrine-triggers"'} if status == 401 else None
        return web.json_response(body, status=status, headers=headers)

    async def alerts(self, request: web.Request) -> web.Response:
        self.metrics.received.labels("alertmanager").inc()
        if not authorised(request.headers.get("Authorization"), self.token):
            return self._refuse("unauthorized", 401, {"error": "missing or wrong bearer token (Authorization: Bearer <token>)"})
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._refuse("too_large", 413, {"error": f"body larger than {self.cfg.max_body_bytes} bytes"})
        try:
            notification = Notification.model_validate_json(body)
        except ValidationError as exc:
            details = [{"field": ".".join(map(str, e["loc"])) or "body", "problem": e["msg"]}
                       for e in exc.errors(include_input=False, include_url=False)][:20]
            return self._refuse("malformed", 400, {"error": "not an Alertmanager webhook notification (version 4)", "details": details})
        alerts = notification.retrain_alerts(self.cfg.action_label)
        if not alerts:
            self.metrics.rejected.labels("ignored").inc()
            return web.json_response({"status": "ignored", "detail": f"no firing alert labelled action={self.cfg.action_label}"})
        return await self._trigger("drift", notification_key(notification, alerts), describe(alerts))

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "run_in_progress": self._running(), "last_run_id": self.state.last_run_id})

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # --- deciding and starting ------------------------------------------------------------------------------
    def _running(self) -> bool:
        return self._child is not None and self._child.returncode is None

    async def _trigger(self, trigger: str, key: str | None, cause: str) -> web.Response:
        async with self._decide:
            busy = self._running() or await asyncio.to_thread(is_locked, self.home)
            decision = self.state.decide(key, busy, time.time())
            if decision != "start":
                self.metrics.rejected.labels(decision).inc()
                detail = {"duplicate": "this notification already started a run",
                          "busy": "a pipeline run is in progress",
                          "debounced": f"the last run started less than {self.cfg.debounce_s:g}s ago"}[decision]
                return web.json_response({"status": decision, "detail": detail, "last_run_id": self.state.last_run_id})
            run_id = new_run_id()
            try:
                await self._spawn(trigger, run_id, cause)
            except OSError as exc:
                return self._refuse("spawn_failed", 500, {"error": f"could not start the pipeline: {exc}"})
            await asyncio.to_thread(self.state.started, key, run_id, time.time())
        self.metrics.started.labels(trigger).inc()
        return web.json_response({"status": "started", "run_id": run_id}, status=202)

    async def _spawn(self, trigger: str, run_id: str, cause: str) -> None:
        logs = self.home / "logs"
        await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
        out = await asyncio.to_thread(open, logs / f"{run_id}.log", "ab")
        try:
            self._child = await asyncio.create_subprocess_exec(
                *self.command, "--trigger", trigger, "--run-id", run_id, *(["--cause", cause] if cause else []), stdin=asyncio.subprocess.DEVNULL,
                stdout=out, stderr=asyncio.subprocess.STDOUT, env=os.environ.copy())
        finally:
            out.close()
        self.metrics.running.set(1)
        log.info("started pipeline run %s (trigger %s, pid %s)", run_id, trigger, self._child.pid)
        task = asyncio.create_task(self._reap(self._child, run_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reap(self, child: asyncio.subprocess.Process, run_id: str) -> None:
        code = await child.wait()
        outcome = OUTCOMES.get(code, "busy" if code == 5 else "error")
        self.metrics.finished.labels(outcome).inc()
        self.metrics.running.set(1 if self._running() else 0)
        log.info("pipeline run %s ended: %s (exit %s)", run_id, outcome, code)

    async def schedule(self, interval_s: float) -> None:
        """A scheduled run every `interval_s` (busy and debounce apply; no notification key)."""
        while True:
            await asyncio.sleep(interval_s)
            self.metrics.received.labels("schedule").inc()
            await self._trigger("schedule", None, f"every {interval_s:g}s (triggers.schedule_interval_s)")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    token = await asyncio.to_thread(read_token, settings.triggers_token_file)
    service = TriggerService(settings, token)
    runner = web.AppRunner(service.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.triggers.host, settings.triggers.port)
    await site.start()
    scheduled = (asyncio.create_task(service.schedule(settings.triggers.schedule_interval_s))
                 if settings.triggers.schedule_interval_s else None)
    log.warning("triggers listening on http://%s:%s (schedule: %s)", settings.triggers.host, settings.triggers.port,
                f"every {settings.triggers.schedule_interval_s:g}s" if scheduled else "off")
    try:
        await stop.wait()
    finally:
        if scheduled:
            scheduled.cancel()
        await service.close()
        await runner.cleanup()


def main(settings: Settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(run())
