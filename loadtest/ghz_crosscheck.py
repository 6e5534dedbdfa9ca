"""Cross-check of our load generator with an independent client, ghz (github.com/bojand/ghz, Go).

Both send the same Recommend request to the same gateway at the same constant rate, alternating
(three pairs by default); the medians of their percentiles should agree within TOLERANCE. ghz paces
with a token bucket over a worker pool and measures each call from when it left; ours is open-loop
from the intended send time. At a load well below capacity the two measure the same thing. Install ghz with `make ghz`.
Run: `python -m vitrine.loadtest.ghz_crosscheck --rate 100 --duration 15`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
from pathlib import Path

from vitrine.loadtest.arguments import bounded_int
from vitrine.loadtest.load_generator import Outcome, run
from vitrine.services.gateway.client import GatewayClient
from vitrine.settings import REPO_ROOT, Settings

TOLERANCE = 0.25
"""Relative difference of p50 (and p90) accepted between the two clients."""
KEY = "vitrine-demo-storefront"
USER = "u11"


def ghz_binary() -> str:
    found = shutil.which("ghz") or str(Path(os.environ.get("VITRINE_CACHE", Path.home() / ".cache" / "vitrine")) / "go" / "bin" / "ghz")
    if not Path(found).exists():
        raise FileNotFoundError("ghz not found; run `make ghz`")
    return found


def run_ghz(settings: Settings, rate: int, duration_s: int) -> dict[str, object]:
    command = [
        ghz_binary(), "--insecure", "--proto", "proto/vitrine/v1/recommender.proto", "--import-paths", "proto",
        "--call", "vitrine.v1.Recommender.Recommend", "-d", json.dumps({"user_id": USER, "k": 10}),
        "--metadata", json.dumps({"authorization": f"Bearer {KEY}"}), "--rps", str(rate), "-z", f"{duration_s}s",
        "-c", "50", "--connections", "1", "-t", "1s", "-O", "json", settings.gateway.address,
    ]
    report = json.loads(subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True, text=True).stdout)
    latencies = {d["percentage"]: d["latency"] / 1e6 for d in report["latencyDistribution"]}
    return {"p50_ms": latencies[50], "p90_ms": latencies[90], "p99_ms": latencies[99], "rate": report["rps"],
            "errors": {code: n for code, n in report.get("statusCodeDistribution", {}).items() if code != "OK"}}


async def run_ours(settings: Settings, rate: int, duration_s: int) -> dict[str, object]:
    async with GatewayClient(settings.gateway.address, KEY) as client:
        async def send(n: int) -> Outcome:
            reply = await client.recommend(USER, k=10, timeout_s=1.0)
            return Outcome(degraded=reply.degraded, variant=reply.variant)

        result = await run(send, rate, duration_s, warmup_s=1.0, arrivals="constant")
    return {"p50_ms": result.percentile_ms(50), "p90_ms": result.percentile_ms(90), "p99_ms": result.percentile_ms(99),
            "rate": result.achieved_rate, "errors": {code: n for code, n in result.codes.items() if code != "OK"}}


def _median_of(runs: list[dict[str, object]]) -> dict[str, object]:
    merged: dict[str, object] = {key: statistics.median(r[key] for r in runs) for key in ("p50_ms", "p90_ms", "p99_ms", "rate")}  # type: ignore[misc]
    errors: dict[str, int] = {}
    for r in runs:
        for code, n in r["errors"].items():  # type: ignore[union-attr]
            errors[code] = errors.get(code, 0) + n
    merged["errors"] = errors
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=bounded_int(1, 5000), default=100, metavar="RPS")
    parser.add_argument("--duration", type=bounded_int(2, 600), default=15, metavar="SECONDS")
    parser.add_argument("--repeats", type=bounded_int(1, 9), default=3, metavar="N",
                        help="alternating runs of each client; medians are compared (one stall cannot decide)")
    args = parser.parse_args()
    settings = Settings()
    pairs = [(run_ghz(settings, args.rate, args.duration), asyncio.run(run_ours(settings, args.rate, args.duration)))
             for _ in range(args.repeats)]
    theirs, ours = _median_of([p[0] for p in pairs]), _median_of([p[1] for p in pairs])
    print(f"| client (median of {args.repeats} alternating runs) | rate | p50 ms | p90 ms | p99 ms | errors (all runs) |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in (("ghz", theirs), ("vitrine load generator", ours)):
        print(f"| {name} | {r['rate']:.0f}/s | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{', '.join(f'{c} {n}' for c, n in r['errors'].items()) or 'none'} |")
    for q in ("p50_ms", "p90_ms"):
        diff = abs(ours[q] - theirs[q]) / theirs[q]
        runs = ", ".join(f"{abs(o[q] - t[q]) / t[q]:.0%}" for t, o in pairs)
        print(f"{q}: relative difference of the medians {diff:.0%} ({'within' if diff <= TOLERANCE else 'outside'} ±{TOLERANCE:.0%}); per pair {runs}")


if __name__ == "__main__":
    main()
