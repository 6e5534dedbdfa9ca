"""Builds grafana/dashboards/*.json from the panel definitions below (`make dashboards`).

The JSON files are committed (Grafana provisions them from grafana/provisioning/); a test checks
that they are what this script writes, that panel ids are unique, that every datasource is the
provisioned one, and — against a live Prometheus — that every panel's query returns data.
Queries use only metric names defined in services/*/metrics.py (the outcome service's are imported
from it), the recorded series of deploy/prometheus/alerts.yml, Triton's and redis_exporter's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vitrine.services.outcomes import metrics as outcomes

DATASOURCE = {"type": "prometheus", "uid": "vitrine-prometheus"}
OUT = Path(__file__).parent / "dashboards"
SLO_SECONDS = 0.025
SRM_THRESHOLD = 0.001
"""Below this SRM p-value the split is broken (the VitrineSampleRatioMismatch alert's threshold)."""
OUTCOME_WINDOW = "15m"
"""Window of the live CTR and conversion panels: clicks and purchases are sparse, a minute's ratio is noise."""


def _var(name: str, label: str, query: str) -> dict:
    return {
        "name": name, "label": label, "type": "query", "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-var"}, "definition": query, "refresh": 2,
        "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"},
    }


def _panel(title: str, description: str, targets: list[tuple[str, str]], unit: str = "short", kind: str = "timeseries",
           thresholds: list[tuple[float, str]] | None = None, width: int = 12, height: int = 8, base: str = "green") -> dict:
    steps = [{"color": base, "value": None}] + [{"color": color, "value": value} for value, color in thresholds or []]
    panel = {
        "type": kind, "title": title, "description": description, "datasource": DATASOURCE,
        "gridPos": {"w": width, "h": height},
        "targets": [{"refId": chr(65 + i), "expr": expr, "legendFormat": legend, "datasource": DATASOURCE,
                     **({"format": "heatmap"} if kind == "heatmap" else {})} for i, (expr, legend) in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}}, "overrides": []},
        "options": {},
    }
    if kind == "heatmap":
        panel["options"] = {"calculate": False, "yAxis": {"unit": unit}, "cellGap": 1}
    if kind == "stat":
        panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                            "colorMode": "background", "graphMode": "area", "textMode": "value_and_name"}
    return panel


def _text(title: str, content: str, width: int = 24, height: int = 4) -> dict:
    return {"type": "text", "title": title, "gridPos": {"w": width, "h": height}, "options": {"mode": "markdown", "content": content}}


VARIANT = 'variant=~"$variant"'


def serving() -> dict:
    return _dashboard("vitrine-serving", "Vitrine / Serving", ["variant", "model"], [
        _panel("Requests per second by variant", "Answered Recommend calls (all status codes), per A/B variant.",
               [(f'sum by (variant) (rate(vitrine_gateway_requests_total{{method=~"Recommend.*",{VARIANT}}}[$__rate_interval]))', "{{variant}}")], "reqps"),
        _panel("Server error ratio", "Share of calls failing server-side (client errors such as INVALID_ARGUMENT excluded). Alert at 1 %.",
               [("vitrine:gateway_error_ratio:5m", "error ratio")], "percentunit", thresholds=[(0.01, "red")]),
        _panel("Latency p50 / p95 / p99 by variant", f"End-to-end time inside the gateway. SLO: p99 ≤ {SLO_SECONDS * 1000:.0f} ms.",
               [(f"histogram_quantile({q}, sum by (le, variant) (rate(vitrine_gateway_request_duration_seconds_bucket{{{VARIANT}}}[$__rate_interval])))",
                 f"p{int(q * 100)} {{{{variant}}}}") for q in (0.5, 0.95, 0.99)], "s", thresholds=[(SLO_SECONDS, "red")]),
        _panel("Latency p99 per stage", "Where the time goes: features (Redis), queue (micro-batcher), triton (the call), postprocess.",
               [("histogram_quantile(0.99, sum by (le, stage) (rate(vitrine_gateway_stage_duration_seconds_bucket[$__rate_interval])))", "{{stage}}")], "s"),
        _panel("Micro-batch size", "Requests per Triton call: mean and p90, per model.",
               [('sum by (model) (rate(vitrine_gateway_batch_size_requests_sum{model=~"$model"}[$__rate_interval])) '
                 '/ sum by (model) (rate(vitrine_gateway_batch_size_requests_count{model=~"$model"}[$__rate_interval]))', "mean {{model}}"),
                ('histogram_quantile(0.9, sum by (le, model) (rate(vitrine_gateway_batch_size_requests_bucket{model=~"$model"}[$__rate_interval])))', "p90 {{model}}")]),
        _panel("Triton queue and compute time per request", "From Triton's own metrics, per model: time in Triton's queue and in compute.",
               [('sum by (model) (rate(nv_inference_queue_duration_us{model=~"$model"}[$__rate_interval])) '
                 '/ sum by (model) (rate(nv_inference_request_success{model=~"$model"}[$__rate_interval]))', "queue {{model}}"),
                ('sum by (model) (rate(nv_inference_compute_infer_duration_us{model=~"$model"}[$__rate_interval])) '
                 '/ sum by (model) (rate(nv_inference_request_success{model=~"$model"}[$__rate_interval]))', "compute {{model}}")], "µs"),
        _panel("Degraded answers by reason", "Answers from the popularity fallback, by cause. Alert above 5 % of answers.",
               [(f"sum by (reason) (increase(vitrine_gateway_degraded_total{{{VARIANT}}}[15m]))", "{{reason}}")], "short"),
        _panel("In-flight requests", "Recommend calls being answered right now (all gateways).",
               [("sum(vitrine_gateway_inflight_requests)", "in flight")], "short"),
        _panel("Model versions ready in Triton", "1 when the model version an A/B variant uses is ready.",
               [("vitrine:gateway_model_ready:min", "{{model_name}}:{{model_version}}")], "short", thresholds=[(0, "red"), (1, "green")]),
    ])


def features() -> dict:
    return _dashboard("vitrine-features", "Vitrine / Features", [], [
        _panel("Events applied per second by type", "Storefront events that changed features in Redis.",
               [("sum by (type) (rate(vitrine_features_events_applied_total[$__rate_interval]))", "{{type}}")], "ops"),
        _panel("Dead-lettered events by reason", "Records sent to events.dlq instead of being applied (last 15 min).",
               [("sum by (reason) (increase(vitrine_features_events_rejected_total[15m]))", "{{reason}}")], "short"),
        _panel("Duplicates skipped", "Events whose event_id was already applied (replays, producer retries), last 15 min.",
               [("sum(increase(vitrine_features_events_deduplicated_total[15m]))", "duplicates")], "short"),
        _panel("Consumer lag per partition", "High watermark minus the next offset to process. Alert above 10,000.",
               [("sum by (partition) (vitrine_features_consumer_lag_messages)", "partition {{partition}}")], "short", thresholds=[(10000, "red")]),
        _panel("Freshness p50 / p99", "Feature visible in Redis minus event time. Alert when p99 > 500 ms.",
               [(f"histogram_quantile({q}, sum by (le) (rate(vitrine_features_freshness_seconds_bucket[$__rate_interval])))", f"p{int(q * 100)}")
                for q in (0.5, 0.99)], "s", thresholds=[(0.05, "yellow"), (0.5, "red")]),
        _panel("Batch size and write time", "Records per consumer batch (mean) and time to validate, dead-letter and write it (p99).",
               [("rate(vitrine_features_batch_size_events_sum[$__rate_interval]) / rate(vitrine_features_batch_size_events_count[$__rate_interval])", "events per batch"),
                ("histogram_quantile(0.99, sum by (le) (rate(vitrine_features_batch_duration_seconds_bucket[$__rate_interval]))) * 1000", "p99 batch ms")]),
        _panel("Redis memory", "Memory used by the feature store's Redis.", [("redis_memory_used_bytes", "used")], "bytes"),
        _panel("Redis commands per second", "All commands, from redis_exporter.", [("rate(redis_commands_processed_total[$__rate_interval])", "commands")], "ops"),
    ])


def experiments() -> dict:
    return _dashboard("vitrine-experiments", "Vitrine / Experiments", ["variant"], [
        _panel("Current split", "Traffic share per variant as the gateways serve it (from Redis, followed over pub/sub).",
               [("max by (variant, model_name, model_version) (vitrine_gateway_variant_weight_percent)", "{{variant}} → {{model_name}}:{{model_version}}")],
               "percent", kind="bargauge", width=8),
        _panel("Traffic per variant", "Successful answers per second.",
               [(f'sum by (variant) (rate(vitrine_gateway_requests_total{{code="OK",{VARIANT}}}[$__rate_interval]))', "{{variant}}")], "reqps", width=8),
        _panel("Exposures logged per second", "Records written to Kafka recs.served, and records dropped because the buffer was full.",
               [("sum(rate(vitrine_gateway_exposures_sent_total[$__rate_interval]))", "sent"),
                ("sum(rate(vitrine_gateway_exposures_dropped_total[$__rate_interval]))", "dropped")], "ops", width=8),
        _panel("Latency p99 per variant", "End-to-end gateway latency, per variant.",
               [(f"histogram_quantile(0.99, sum by (le, variant) (rate(vitrine_gateway_request_duration_seconds_bucket{{{VARIANT}}}[$__rate_interval])))", "{{variant}}")],
               "s", thresholds=[(SLO_SECONDS, "red")]),
        _panel("Degraded share per variant", "Share of a variant's answers that came from the fallback.",
               [(f"sum by (variant) (rate(vitrine_gateway_degraded_total{{{VARIANT}}}[15m])) / sum by (variant) (rate(vitrine_gateway_requests_total{{code=\"OK\",{VARIANT}}}[15m]))", "{{variant}}")],
               "percentunit"),
        _panel("Top-1 score distribution", "Score of the first recommended item (model answers), per bucket.",
               [(f"sum by (le) (increase(vitrine_gateway_top1_score_bucket{{{VARIANT}}}[$__rate_interval]))", "{{le}}")], "short", kind="heatmap"),
        _panel("Mean top-k score distribution", "Mean score of the returned items (model answers), per bucket.",
               [(f"sum by (le) (increase(vitrine_gateway_mean_topk_score_bucket{{{VARIANT}}}[$__rate_interval]))", "{{le}}")], "short", kind="heatmap"),
        _panel("Input drift (PSI) per feature", "Population stability index of live inputs/outputs against the model version's baseline (its first requests in serving, docs/drift.md). > 0.25: retrain.",
               [(f"max by (feature, variant) (vitrine_drift_psi{{{VARIANT}}})", "{{feature}} {{variant}}")], "short",
               thresholds=[(0.1, "yellow"), (0.25, "red")], width=24),
        *outcome_panels(),
    ])


def outcome_panels() -> list[dict]:
    """CTR and conversion per variant (the outcome service's live counters), and the experiment monitor's analysis."""
    w = OUTCOME_WINDOW

    def ratio(numerator: str, denominator: str) -> str:
        # No `or 0 * denominator` fallback: a wrong selector must show a gap (and fail the panel test), not a CTR of 0.
        return f"sum by (experiment, variant) (rate({numerator}[{w}])) / sum by (experiment, variant) (rate({denominator}{{{VARIANT}}}[{w}]))"

    return [
        _text("Outcomes", "Exposures (`recs.served`) joined with the same users' later clicks, add-to-carts and purchases by the "
              "outcome service (attribution rule: docs/experiments.md). The counters below are live views; the decision is the "
              "monitor's per-user analysis (lift with its interval, always-valid p-value, SRM), the same as `vitrine ab report`.",
              height=3),
        _panel("Click-through rate per variant", f"Attributed clicks / items shown (impressions), per experiment and variant, over {w}. "
               "Live counters: a credit that later moves to another exposure is not subtracted (the analysis is per user).",
               [(ratio(f'{outcomes.ATTRIBUTED}{{type="click",{VARIANT}}}', outcomes.IMPRESSIONS), "{{experiment}} / {{variant}}")],
               "percentunit", width=8),
        _panel("Conversion per variant", f"Attributed purchases / exposures (answers shown), per experiment and variant, over {w}.",
               [(ratio(f'{outcomes.ATTRIBUTED}{{type="purchase",{VARIANT}}}', outcomes.EXPOSURES_JOINED), "{{experiment}} / {{variant}}")],
               "percentunit", width=8),
        _panel("Sample ratio mismatch (SRM) p-value", f"Always-valid (sequential) test of users per variant against the configured weights, every revision of the "
               f"current test (a ramp's entrants against their revision's weights), running minimum. Red below {SRM_THRESHOLD}: the split "
               f"is broken (assignment, logging or bots) and the flag stays — do not trust the experiment's results.",
               [("vitrine:experiment_srm_p_value:min", "{{experiment}}")], "none", kind="stat", base="red",
               thresholds=[(SRM_THRESHOLD, "green")], width=8),
        _panel("Relative lift vs control (95 % interval)", "The monitor's delta-method estimate of (variant − control) / control per user, "
               "for CTR and conversion, with the bounds of its 95 % interval. An interval that excludes 0 is a difference at the "
               "fixed horizon; read the always-valid p-value before stopping early.",
               [(f'max by (variant, metric, bound) ({outcomes.RELATIVE_LIFT}{{metric=~"ctr|conversion",{VARIANT}}})',
                 "{{variant}} {{metric}} {{bound}}")], "percentunit", thresholds=[(0, "blue")]),
        _panel("Always-valid p-value per variant", "mSPRT p-value of each variant against control (on the CUPED-adjusted difference "
               "when a pre-experiment covariate exists), the running minimum over every look of the test — all revisions of a ramp: "
               "valid whenever it is read. The verdict also Holm-corrects across variants (`vitrine ab report`).",
               [(f"min by (variant, metric) ({outcomes.SEQUENTIAL_P_VALUE}{{{VARIANT}}})", "{{variant}} {{metric}}")], "none",
               base="blue", thresholds=[(0.05, "text")]),
        _panel("Users per variant", "Users of the current test (all revisions of a ramp), each in the variant she entered with.",
               [(f"max by (experiment, variant) ({outcomes.EXPERIMENT_USERS})", "{{experiment}} / {{variant}}")], "short", width=8),
        _panel("Interleaving preference per team", "Interleave mode: share of users with a preference (more clicks on one team's "
               "slots) who prefer this team. 50 % is no difference. Exported only while the current experiment interleaves.",
               [(f"max by (experiment, team) ({outcomes.INTERLEAVING_PREFERENCE})", "{{experiment}} / {{team}}")], "percentunit",
               thresholds=[(0.5, "blue")], width=8),
        _panel("Guardrails per variant", "Each variant's p99 latency and degraded ratio over 5 min, as a multiple of its limit "
               "(the recorded series of VitrineVariantGuardrailBreach, which fires above 1 for 10 min). Limits: p99 above "
               f"{SLO_SECONDS * 1000:.0f} ms or clearly above the best variant's; degraded ratio above 5 % or 2 points above the best variant's.",
               [(f'max by (variant, guardrail) (vitrine:experiment_guardrail_ratio:5m{{{VARIANT}}})', "{{variant}} {{guardrail}}")],
               "short", thresholds=[(1, "red")], width=8),
    ]


def _dashboard(uid: str, title: str, variables: list[str], panels: list[dict]) -> dict:
    templates = {"variant": _var("variant", "Variant", "label_values(vitrine_gateway_requests_total, variant)"),
                 "model": _var("model", "Model", "label_values(nv_inference_request_success, model)")}
    x = y = 0
    for number, panel in enumerate(panels, start=1):
        panel["id"] = number
        w, h = panel["gridPos"]["w"], panel["gridPos"]["h"]
        if x + w > 24:
            x, y = 0, y + h
        panel["gridPos"].update({"x": x, "y": y})
        x += w
    return {
        "uid": uid, "title": title, "tags": ["vitrine"], "timezone": "utc", "schemaVersion": 39, "version": 1,
        "refresh": "10s", "time": {"from": "now-30m", "to": "now"}, "editable": True,
        "templating": {"list": [templates[v] for v in variables]}, "panels": panels,
        "annotations": {"list": []},
    }


DASHBOARDS = {"serving": serving, "features": features, "experiments": experiments}


def render_all() -> dict[str, str]:
    return {f"{name}.json": json.dumps(build(), indent=2, ensure_ascii=False) + "\n" for name, build in DASHBOARDS.items()}


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for file_name, text in render_all().items():
        (OUT / file_name).write_text(text)
        print(f"wrote {OUT / file_name}", file=sys.stderr)
