"""Self-contained HTML reports (inline SVG: no JavaScript, no matplotlib, opens offline) and the base-vs-tuned
comparison with paired significance.

* ``write_report``: score per effort with 95% intervals (accuracy vs effort), failure breakdown per effort,
  per-sample table (id, effort, score, failure, parsed answer).
* ``compare_runs``: two run folders on the same items; per effort the score difference with a paired bootstrap
  interval, the exact McNemar p-value on pass/fail, and the items that flipped either way.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from gptoss_train.eval.results import atomic_write_text, read_run
from gptoss_train.eval.stats import mcnemar_exact, paired_bootstrap

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}table{border-collapse:collapse;font-size:.9em}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f4f4f4}
.pass{color:#1a7f37}.fail{color:#cf222e}code,pre{font-size:.85em}pre{white-space:pre-wrap;max-width:600px;margin:0}
.muted{color:#777}
"""
_COLOURS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"]


def _svg_bars(groups: list[tuple[str, float, tuple[float, float] | None]], *, title: str, y_max: float = 1.0,
              width: int = 520, height: int = 240) -> str:
    """Vertical bars with optional interval whiskers; values in [0, y_max]."""
    left, bottom, top = 46, 30, 24
    plot_h = height - bottom - top
    n = max(1, len(groups))
    slot = (width - left - 10) / n
    bar_w = min(60, slot * 0.6)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<text x="{width / 2}" y="15" text-anchor="middle" font-size="13">{html.escape(title)}</text>']
    for tick in range(0, 5):
        value = y_max * tick / 4
        y = top + plot_h - plot_h * tick / 4
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{value:.2g}</text>')
    for i, (label, value, interval) in enumerate(groups):
        x = left + slot * i + (slot - bar_w) / 2
        h = plot_h * (value / y_max if y_max else 0)
        colour = _COLOURS[i % len(_COLOURS)]
        parts.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                     f'fill="{colour}"><title>{html.escape(label)}: {value:.3f}</title></rect>')
        if interval:
            y_low = top + plot_h - plot_h * interval[0] / y_max
            y_high = top + plot_h - plot_h * interval[1] / y_max
            cx = x + bar_w / 2
            parts.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y_low:.1f}" y2="{y_high:.1f}" stroke="#333"/>')
            for y in (y_low, y_high):
                parts.append(f'<line x1="{cx - 6:.1f}" x2="{cx + 6:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="#333"/>')
        parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{height - 10}" text-anchor="middle" font-size="11">'
                     f'{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{body}</body></html>\n")


def _answer_of(record: dict) -> str:
    details = record.get("details") or {}
    if "prediction" in details:
        return f"{details.get('prediction')!s} (gold {details.get('gold')!s})"
    turns = details.get("turns")
    last = turns[-1] if turns else details
    if last.get("tool_calls"):
        call = last["tool_calls"][0]
        return f"{call.get('name')}({call.get('arguments')})"
    return str(last.get("final") or "")[:200]


def render_report(results: dict, records: list[dict]) -> str:
    metrics = results.get("metrics", {})
    model = results.get("model", {})
    body = [f"<h1>gptoss-eval: {html.escape(results.get('suite', ''))}</h1>",
            f"<p>model <code>{html.escape(str(model.get('model', model.get('backend'))))}</code>"
            f" ({html.escape(str(model.get('backend')))})"
            + (f", adapter <code>{html.escape(str(model['adapter']))}</code>" if model.get("adapter") else "")
            + f"; {results.get('data', {}).get('n', 0)} samples, data fingerprint "
              f"<code>{html.escape(str(results.get('data', {}).get('fingerprint')))}</code></p>"]
    for warning in results.get("warnings", []):
        body.append(f"<p class='fail'>warning: {html.escape(warning)}</p>")
    # summary table
    rows = ["<tr><th>effort</th><th>n</th><th>score</th><th>95% interval</th><th>pass rate</th><th>failures</th></tr>"]
    for effort, m in metrics.items():
        ci = m.get("score_ci", {}).get("ci95", [0, 0])
        failures = ", ".join(f"{k}: {v}" for k, v in (m.get("failures") or {}).items()) or "none"
        rows.append(f"<tr><td>{effort}</td><td>{m.get('n')}</td><td>{m.get('score', 0):.3f}</td>"
                    f"<td>[{ci[0]:.3f}, {ci[1]:.3f}]</td><td>{m.get('pass_rate', 0):.3f}</td>"
                    f"<td>{html.escape(failures)}</td></tr>")
    body.append("<h2>Summary</h2><table>" + "".join(rows) + "</table>")
    extra = {k: v for m in metrics.values() for k, v in m.items()
             if k not in ("n", "score", "pass_rate", "score_ci", "failures") and isinstance(v, (int, float))}
    if extra:
        body.append("<p class='muted'>other metrics: " + html.escape(", ".join(
            f"{effort}/{k}={v:.3f}" for effort, m in metrics.items() for k, v in m.items() if k in extra
            and isinstance(v, (int, float)))) + "</p>")
    # plots
    bars = [(effort, m.get("score", 0.0), tuple(m.get("score_ci", {}).get("ci95", [0, 0]))) for effort, m in
            metrics.items()]
    body.append("<h2>Score vs reasoning effort</h2>" + _svg_bars(bars, title="score (95% interval)"))
    failure_kinds = sorted({k for m in metrics.values() for k in (m.get("failures") or {})})
    if failure_kinds:
        for effort, m in metrics.items():
            n = max(1, m.get("n", 1))
            groups = [(kind, (m.get("failures") or {}).get(kind, 0) / n, None) for kind in failure_kinds]
            body.append(_svg_bars(groups, title=f"failure share by kind, effort {effort}", width=110 * len(groups) + 60))
    # samples
    sample_rows = ["<tr><th>id</th><th>effort</th><th>score</th><th>failure</th><th>answer</th></tr>"]
    for record in records:
        css = "pass" if record.get("passed") else "fail"
        sample_rows.append(
            f"<tr><td>{html.escape(str(record['id']))}</td><td>{record.get('effort')}</td>"
            f"<td class='{css}'>{float(record.get('score', 0)):.2f}</td><td>{record.get('failure') or ''}</td>"
            f"<td><pre>{html.escape(_answer_of(record))}</pre></td></tr>")
    body.append("<h2>Samples</h2><table>" + "".join(sample_rows) + "</table>")
    body.append("<h2>Configuration</h2><pre>" + html.escape(json.dumps(
        {k: results.get(k) for k in ("model", "config", "data", "run")}, indent=2, default=str)) + "</pre>")
    return _page(f"gptoss-eval {results.get('suite', '')}", "".join(body))


def write_report(out_dir, results: dict, records: list[dict], path=None) -> Path:
    path = Path(path or Path(out_dir) / "report.html")
    atomic_write_text(path, render_report(results, records))
    return path


# ---------------------------------------------------------------------- compare
def compare_runs(base_dir, tuned_dir) -> dict:
    """Paired comparison of two runs of one suite (base vs tuned) on the items both ran, per effort."""
    base_results, base_records = read_run(base_dir)
    tuned_results, tuned_records = read_run(tuned_dir)
    if base_results.get("suite") != tuned_results.get("suite"):
        raise ValueError(f"cannot compare suite {base_results.get('suite')!r} with {tuned_results.get('suite')!r}")
    if base_results.get("data", {}).get("fingerprint") != tuned_results.get("data", {}).get("fingerprint"):
        note = "data fingerprints differ: only items present in both runs are compared"
    else:
        note = None
    base_by = {(r.get("effort"), r["id"]): r for r in base_records}
    tuned_by = {(r.get("effort"), r["id"]): r for r in tuned_records}
    efforts = sorted({key[0] for key in base_by} & {key[0] for key in tuned_by}, key=str)
    if not efforts:
        raise ValueError(f"{base_dir} and {tuned_dir} share no reasoning effort: run both with the same --effort")
    comparison = {"suite": base_results.get("suite"), "base": str(base_dir), "tuned": str(tuned_dir),
                  "base_model": base_results.get("model"), "tuned_model": tuned_results.get("model"),
                  "note": note, "efforts": {}}
    for effort in efforts:
        keys = sorted(k for k in base_by if k[0] == effort and k in tuned_by)
        base_scores = [float(base_by[k]["score"]) for k in keys]
        tuned_scores = [float(tuned_by[k]["score"]) for k in keys]
        fixed = [k[1] for k in keys if not base_by[k].get("passed") and tuned_by[k].get("passed")]
        broken = [k[1] for k in keys if base_by[k].get("passed") and not tuned_by[k].get("passed")]
        comparison["efforts"][effort] = {
            "n": len(keys),
            "base_score": sum(base_scores) / len(keys) if keys else 0.0,
            "tuned_score": sum(tuned_scores) / len(keys) if keys else 0.0,
            "paired_bootstrap": paired_bootstrap(base_scores, tuned_scores),
            "mcnemar_p": mcnemar_exact(len(broken), len(fixed)),
            "fixed": fixed,  # failed in base, passed after tuning
            "broken": broken,  # passed in base, failed after tuning
        }
    return comparison


def render_compare(comparison: dict) -> str:
    body = [f"<h1>gptoss-eval compare: {html.escape(str(comparison['suite']))}</h1>",
            f"<p>base <code>{html.escape(comparison['base'])}</code> vs tuned "
            f"<code>{html.escape(comparison['tuned'])}</code></p>"]
    if comparison.get("note"):
        body.append(f"<p class='fail'>{html.escape(comparison['note'])}</p>")
    rows = ["<tr><th>effort</th><th>n</th><th>base</th><th>tuned</th><th>delta [95% paired bootstrap]</th>"
            "<th>McNemar p</th><th>fixed</th><th>broken</th></tr>"]
    bars = []
    for effort, c in comparison["efforts"].items():
        pb = c["paired_bootstrap"]
        rows.append(f"<tr><td>{effort}</td><td>{c['n']}</td><td>{c['base_score']:.3f}</td><td>{c['tuned_score']:.3f}"
                    f"</td><td>{pb['delta']:+.3f} [{pb['ci95'][0]:+.3f}, {pb['ci95'][1]:+.3f}]</td>"
                    f"<td>{c['mcnemar_p']:.3g}</td><td>{len(c['fixed'])}</td><td>{len(c['broken'])}</td></tr>")
        bars += [(f"base {effort}", c["base_score"], None), (f"tuned {effort}", c["tuned_score"], None)]
    body.append("<table>" + "".join(rows) + "</table>")
    body.append(_svg_bars(bars, title="base vs tuned", width=max(300, 110 * len(bars) + 60)))
    for effort, c in comparison["efforts"].items():
        for kind in ("fixed", "broken"):
            if c[kind]:
                body.append(f"<h2>{kind} items ({effort})</h2><p>"
                            + ", ".join(f"<code>{html.escape(i)}</code>" for i in c[kind]) + "</p>")
    return _page(f"gptoss-eval compare {comparison['suite']}", "".join(body))
