"""The model card: one readable page per registered version, for the people who decide whether it serves.

What data the model saw (the archive window and its partitions, row counts, the data fingerprint), how it
ranks against the champion it would replace and against the counting baselines (popularity, transitions,
co-occurrence) overall and per slice, and a few example recommendations with their explanations — for each
recommended item, the step of the shopper's history that led to it, as the served graph computes it
(`explain_steps`, see `export/models.py`).

`build_card` gathers the facts into a plain dict (also logged as `model_card.json`); `render_markdown` and
`render_html` turn it into the page. The pipeline logs the three files to the version's training run in MLflow
(`card/<model>/<triton version>/`, next to the exported files) when it registers a challenger, and the version's
tag `vitrine.card_uri` points there; `vitrine models card NAME VERSION` prints it.
"""

from __future__ import annotations

import html
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from vitrine.contracts import ranker
from vitrine.contracts.events import EventType
from vitrine.export.data.sequences import FIRST_ITEM, PAD

if TYPE_CHECKING:
    from vitrine.export.registry import Registry

CARD_MARKDOWN, CARD_HTML, CARD_JSON = "model_card.md", "model_card.html", "model_card.json"
CARD_FILES = (CARD_MARKDOWN, CARD_HTML, CARD_JSON)
METRICS = ("recall@10", "recall@20", "ndcg@10", "mrr")
HEADLINE = "recall@10"
EXAMPLES, EXAMPLE_K, EXAMPLE_HISTORY = 3, 5, 20
SECTIONS = ("## Summary", "## Data", "## Against the champion", "## Against the baselines", "## By slice",
            "## Example recommendations", "## How explanations are computed")
"""Every card has these sections, in this order (tests check them)."""
TYPE_NAMES = {t.index: t.value for t in EventType}


def _partitions(since: str | None, until: str | None) -> list[str]:
    if not since or not until:
        return []
    first, last = date.fromisoformat(since), date.fromisoformat(until)
    return [f"date={(first + timedelta(days=d)).isoformat()}" for d in range((last - first).days + 1)]


def examples(onnx_path: Path, vocabulary: tuple[str, ...], items: np.ndarray, types: np.ndarray,
             n: int = EXAMPLES, k: int = EXAMPLE_K) -> list[dict[str, Any]]:
    """`n` validation histories (spread over the held-out sample, among those with at least 3 known steps, or the
    longest there are) through the exported graph:
    the last steps of each history, its top-`k` items and, per item, the history item that explains it (None when
    the graph has no `explain_steps`)."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    explains = ranker.EXPLAIN_STEPS in {o.name for o in session.get_outputs()}
    known = (items >= FIRST_ITEM).sum(axis=1)
    if not len(known) or known.max() == 0:
        return []
    candidates = np.flatnonzero(known >= min(3, int(known.max())))
    rows = sorted({int(candidates[i]) for i in np.linspace(0, len(candidates) - 1, min(n, len(candidates))).round().astype(int)})
    feed = {ranker.ITEM_IDS: items[rows].astype(np.int64), ranker.EVENT_TYPES: types[rows].astype(np.int64),
            ranker.EXCLUDE_IDS: np.zeros((len(rows), 1), dtype=np.int64)}
    outputs = session.run(list(ranker.EXPLAINED_OUTPUTS if explains else ranker.OUTPUTS), feed)
    ids, scores = outputs[0], outputs[1]
    name = lambda i: vocabulary[i - FIRST_ITEM] if i >= FIRST_ITEM else "(unknown item)"  # noqa: E731
    out = []
    for n_row, row in enumerate(rows):
        history = [(p, int(i), int(t)) for p, (i, t) in enumerate(zip(items[row], types[row], strict=True)) if i != PAD]
        recommended = []
        for slot in range(min(k, ids.shape[1])):
            item = int(ids[n_row, slot])
            if item < FIRST_ITEM or scores[n_row, slot] <= ranker.EXCLUDED_SCORE:
                continue
            because = None
            if explains:
                step = int(outputs[2][n_row, slot])
                because = name(int(items[row, step])) if 0 <= step < items.shape[1] else None
            recommended.append({"item": name(item), "score": float(scores[n_row, slot]), "because_of": because})
        out.append({"history": [{"item": name(i), "type": TYPE_NAMES.get(t, str(t))} for _, i, t in history[-EXAMPLE_HISTORY:]],
                    "history_steps": len(history), "recommended": recommended})
    return out


def build_card(run_record: dict[str, Any], registered: dict[str, Any], onnx_path: Path | None = None,
               vocabulary: tuple[str, ...] = (), sample: dict[str, np.ndarray] | None = None,
               evaluation: dict[str, Any] | None = None, gate: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card's facts. `registered`: name, version, triton_version, run_id (and alias); `evaluation`: the pipeline's
    evaluate step for this model (candidate and champion summaries on the same rows); `gate`: its gate decision."""
    data = run_record.get("data", {})
    metrics = run_record.get("metrics", {})
    slice_metrics = run_record.get("slice_metrics", {})
    card: dict[str, Any] = {
        "model": registered.get("name", run_record.get("model")),
        "architecture": run_record.get("model"),
        "registry_version": str(registered.get("version", "")),
        "triton_version": registered.get("triton_version"),
        "alias": registered.get("alias"),
        "run_id": registered.get("run_id"),
        "created_at": run_record.get("created_at"),
        "code_version": run_record.get("code_version"),
        "parameters": {k: run_record.get("parameters", {}).get(k) for k in ("epochs", "dim", "max_len", "learning_rate", "batch_size")
                       if k in run_record.get("parameters", {})},
        "data": {
            "source": data.get("source"),
            "fingerprint": data.get("fingerprint"),
            "window": {"since": data.get("since"), "until": data.get("until")},
            "partitions": _partitions(data.get("since"), data.get("until")),
            "events": data.get("events"), "users": data.get("users"), "items": data.get("items"),
            "training_windows": data.get("train_windows"), "validation_targets": data.get("validation_targets"),
            "vocabulary": data.get("vocabulary"), "cutoff": _ms(data.get("cutoff_ms")),
            "validation_unknown_share": data.get("validation_oov_share"),
        },
        "metrics": {name: {m: values.get(m) for m in METRICS} for name, values in metrics.items()},
        "strongest_baseline": run_record.get("baselines", {}).get("strongest"),
        "slices": {name: {ranker_name: {**{m: s.get(m) for m in METRICS}, "rows": s.get("rows")}
                          for ranker_name, slices in slice_metrics.items() for slice_name, s in slices.items() if slice_name == name}
                   for name in sorted({s for slices in slice_metrics.values() for s in slices})},
        "champion": None,
        "gate": gate,
        "examples": [],
    }
    if evaluation and evaluation.get("champion"):
        card["champion"] = {
            "version": evaluation.get("champion_version"), "k": evaluation.get("k"),
            "candidate": evaluation["candidate"]["overall"], "champion": evaluation["champion"]["overall"],
            "slices": {name: {"candidate": evaluation["candidate"]["slices"].get(name, {}).get(HEADLINE),
                              "champion": s.get(HEADLINE), "rows": s.get("rows")}
                       for name, s in sorted(evaluation["champion"]["slices"].items())},
        }
    elif evaluation is not None:
        card["champion"] = {"version": None}
    if onnx_path is not None and sample is not None and vocabulary:
        card["examples"] = examples(onnx_path, vocabulary, sample["items"], sample["types"])
    return card


def _ms(value: Any) -> str | None:  # noqa: ANN401
    return datetime.fromtimestamp(value / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC") if isinstance(value, int | float) else None


def _n(value: Any) -> str:  # noqa: ANN401
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _delta(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None:
        return "–"
    if theirs == 0:
        return f"{ours - theirs:+.4f}"
    return f"{ours - theirs:+.4f} ({(ours - theirs) / theirs:+.0%})"


def _blocks(card: dict[str, Any]) -> list[tuple[str, Any]]:
    """The page as (kind, content) blocks: ("h1"|"h2"|"p", text), ("table", rows), ("list", items).
    One description, two renderings (Markdown, HTML)."""
    b: list[tuple[str, Any]] = []
    title = f"Model card: {card['model']} v{card['registry_version']}"
    b.append(("h1", title))
    metrics, data = card["metrics"], card["data"]
    model = metrics.get("model", {})
    popularity = metrics.get("popularity", {})
    b.append(("h2", "Summary"))
    summary = (f"A `{card['architecture']}` next-item recommender, registered as version {card['registry_version']} of "
               f"`{card['model']}` (served by Triton as version {card['triton_version']}"
               + (f", alias `{card['alias']}`" if card.get("alias") else "") + "). "
               f"On held-out shopper sessions it finds the item the shopper went to next in its top 10 for "
               f"{_pct(model.get(HEADLINE))} of them, against {_pct(popularity.get(HEADLINE))} for a popularity list.")
    champion = card.get("champion")
    if champion and champion.get("version"):
        ours, theirs = champion["candidate"].get(HEADLINE), champion["champion"].get(HEADLINE)
        summary += f" The champion it would replace (version {champion['version']}) scores {_pct(theirs)} on the same sessions ({_pct(ours)} for this model)."
    if card.get("gate") is not None:
        summary += " The release gate " + ("accepted it." if card["gate"].get("accepted") else "rejected it.")
    b.append(("p", summary))
    b.append(("table", [["run", "trained", "code", "parameters"],
                        [str(card.get("run_id") or "–"), str(card.get("created_at") or "–"), str(card.get("code_version") or "–"),
                         ", ".join(f"{k}={v}" for k, v in card["parameters"].items()) or "–"]]))

    b.append(("h2", "Data"))
    parts = data["partitions"]
    shown = ", ".join(parts if len(parts) <= 8 else [*parts[:3], "…", *parts[-3:]])
    b.append(("table", [["what", "value"],
                        ["source", _n(data["source"])],
                        ["window", f"{_n(data['window']['since'])} → {_n(data['window']['until'])}"],
                        ["archive partitions", f"{len(parts)}: {shown}" if parts else "–"],
                        ["events / shoppers / items", f"{_n(data['events'])} / {_n(data['users'])} / {_n(data['items'])}"],
                        ["training windows", _n(data["training_windows"])],
                        ["held-out targets (evaluation rows)", _n(data["validation_targets"])],
                        ["held out from", _n(data["cutoff"])],
                        ["catalogue known to the model", _n(data["vocabulary"])],
                        ["held-out items unknown to the model", _pct(data["validation_unknown_share"])],
                        ["data fingerprint", f"`{_n(data['fingerprint'])}`"]]))

    b.append(("h2", "Against the champion"))
    if champion and champion.get("version"):
        b.append(("p", f"Both ranked the same newest held-out sessions (ranks within the champion's top {champion.get('k')}); "
                       "the champion's numbers are recomputed on them, not copied from its own run."))
        rows = [["metric", "this model", f"champion v{champion['version']}", "difference"]]
        for m in METRICS:
            rows.append([m, _n(champion["candidate"].get(m)), _n(champion["champion"].get(m)),
                         _delta(champion["candidate"].get(m), champion["champion"].get(m))])
        b.append(("table", rows))
    elif champion is not None:
        b.append(("p", "There was no champion to compare with: this is the model's first version."))
    else:
        b.append(("p", "Not compared with a champion (registered outside the retraining pipeline)."))
    if card.get("gate") and card["gate"].get("reasons"):
        b.append(("list", [str(r) for r in card["gate"]["reasons"]]))

    b.append(("h2", "Against the baselines"))
    b.append(("p", "Every ranker on the same held-out rows and catalogue. Baselines count instead of learning: "
                   "popularity (the most bought/viewed items), transitions (what shoppers opened next after the last item), "
                   "co-occurrence (items seen in the same sessions)."
                   + (f" Strongest baseline: {card['strongest_baseline']}." if card.get("strongest_baseline") else "")))
    rows = [["ranker", *METRICS]]
    for name in ["model", *sorted(n for n in metrics if n != "model")]:
        rows.append(["this model" if name == "model" else name, *[_n(metrics[name].get(m)) for m in METRICS]])
    b.append(("table", rows))

    b.append(("h2", "By slice"))
    b.append(("p", f"{HEADLINE} per group of held-out sessions: an overall win can hide a group the model fails."))
    baselines = sorted(n for n in metrics if n != "model")
    head = ["slice", "rows", "this model", *baselines]
    if champion and champion.get("version"):
        head += ["this model (vs champion)", f"champion v{champion['version']}"]
    rows = [head]
    for name, by_ranker in card["slices"].items():
        model_slice = by_ranker.get("model", {})
        row = [name, _n(model_slice.get("rows")), _n(model_slice.get(HEADLINE)), *[_n(by_ranker.get(bn, {}).get(HEADLINE)) for bn in baselines]]
        if champion and champion.get("version"):
            s = champion["slices"].get(name, {})
            row += [_n(s.get("candidate")), _n(s.get("champion"))]
        rows.append(row)
    b.append(("table", rows) if len(rows) > 1 else ("p", "No slices were recorded."))

    b.append(("h2", "Example recommendations"))
    if not card["examples"]:
        b.append(("p", "No examples (no held-out history with a known item)."))
    for n, example in enumerate(card["examples"], 1):
        history = " → ".join(f"{h['item']} ({h['type']})" for h in example["history"])
        more = example["history_steps"] - len(example["history"])
        b.append(("p", f"**Shopper {n}** — history ({example['history_steps']} steps{', last shown' if more > 0 else ''}): {history}"))
        rows = [["#", "recommended", "because the shopper saw"]]
        for rank, rec in enumerate(example["recommended"], 1):
            rows.append([str(rank), rec["item"], rec["because_of"] or "(no explanation: model without explain_steps)"])
        b.append(("table", rows))

    b.append(("h2", "How explanations are computed"))
    b.append(("p", "For every recommended item the model names the step of the shopper's history whose item is most similar "
                   "to it: the cosine similarity of the two items' vectors in the space the model scores items in. It is "
                   "computed inside the served graph (output `explain_steps`), so the gateway returns it beside the items "
                   "(`explain: true` in the request, `explained_by` per item). It says which past step the recommendation "
                   "resembles most, not everything the model weighed; steps on items unknown to the model never explain."))
    return b


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(card: dict[str, Any]) -> str:
    lines: list[str] = []
    for kind, content in _blocks(card):
        if kind == "h1":
            lines += [f"# {content}", ""]
        elif kind == "h2":
            lines += [f"## {content}", ""]
        elif kind == "p":
            lines += [content, ""]
        elif kind == "list":
            lines += [f"- {item}" for item in content] + [""]
        elif kind == "table":
            lines.append("| " + " | ".join(_md_cell(c) for c in content[0]) + " |")
            lines.append("|" + "|".join(" --- " for _ in content[0]) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in content[1:]]
            lines.append("")
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    """Escape, then the two Markdown marks the card uses: `code` and **bold**."""
    out = html.escape(text)
    parts = out.split("`")
    out = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = out.split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


def render_html(card: dict[str, Any]) -> str:
    body: list[str] = []
    title = ""
    for kind, content in _blocks(card):
        if kind == "h1":
            title = content
            body.append(f"<h1>{_inline_html(content)}</h1>")
        elif kind == "h2":
            body.append(f"<h2>{_inline_html(content)}</h2>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(content)}</p>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in content) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_inline_html(c)}</th>" for c in content[0])
            rows = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in content[1:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;color:#222}"
             "table{border-collapse:collapse;margin:.5rem 0 1rem}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left}"
             "th{background:#f4f4f4}code{background:#f4f4f4;padding:0 .2rem}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def card_files(card: dict[str, Any]) -> dict[str, bytes]:
    """The three files logged per version: Markdown, HTML and the facts as JSON."""
    return {CARD_MARKDOWN: render_markdown(card).encode(), CARD_HTML: render_html(card).encode(),
            CARD_JSON: json.dumps(card, indent=2, default=str).encode()}


def build_from_folders(run_dir: Path, version_folder: Path, registered: dict[str, Any],
                       evaluation: dict[str, Any] | None = None, gate: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card of an exported version from its run folder (record, vocabulary, held-out sample) and its version
    folder (model.onnx)."""
    from vitrine.export.train import VALIDATION_SAMPLE

    record = json.loads((run_dir / "run.json").read_text())
    vocabulary = tuple(json.loads((run_dir / "vocabulary.json").read_text()))
    sample = dict(np.load(run_dir / VALIDATION_SAMPLE)) if (run_dir / VALIDATION_SAMPLE).is_file() else None
    return build_card(record, registered, version_folder / "model.onnx", vocabulary, sample, evaluation, gate)


def log_to_registry(registry: Registry, run_dir: Path, version_folder: Path, registered: dict[str, Any],
                    evaluation: dict[str, Any] | None = None, gate: dict[str, Any] | None = None) -> str:
    """Build a registered version's card (`build_from_folders`) and log it to the version's run; returns its URI."""
    card = build_from_folders(run_dir, version_folder, registered, evaluation, gate)
    return registry.log_card(registered["name"], registered["version"], card_files(card))
