"""Data Docs that work offline: one self-contained HTML page (inline CSS, no scripts,
no external URLs) rendered from the validation report, saved with the run as
``<validation_dir>/data_docs/index.html``. GX's own Data Docs site loads CSS/JS from
CDNs and is written to a temporary folder, so it is not used.
"""
from __future__ import annotations

import html
import json
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem;color:#1d2430;background:#fff}
h1{font-size:1.5rem;margin:0 0 .3rem} h2{font-size:1.15rem;margin:2rem 0 .5rem;border-bottom:1px solid #dde}
h3{font-size:1rem;margin:1.2rem 0 .4rem}
table{border-collapse:collapse;margin:.4rem 0 1rem;width:100%} th,td{border:1px solid #d8dbe3;padding:.3rem .5rem;
text-align:left;vertical-align:top} th{background:#f3f5f9;font-weight:600}
code,pre{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
pre{background:#f6f8fa;padding:.6rem;overflow-x:auto;white-space:pre-wrap;word-break:break-all}
.ok{color:#106b21;font-weight:600} .bad{color:#b3261e;font-weight:600} .muted{color:#667}
.badge{display:inline-block;padding:.1rem .5rem;border-radius:.6rem;color:#fff;font-weight:600}
.badge.ok{background:#1f883d} .badge.bad{background:#cf222e}
"""


def _e(value: Any) -> str:
    if isinstance(value, (dict, list)):
        value = json.dumps(value, ensure_ascii=False, default=str)
    return html.escape("" if value is None else str(value), quote=True)


def _status(ok: bool) -> str:
    return f'<span class="{"ok" if ok else "bad"}">{"passed" if ok else "failed"}</span>'


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(report: dict[str, Any], title: str = "tuneops data validation") -> str:
    ok = bool(report.get("success"))
    parts = [f"<h1>{_e(title)} <span class='badge {'ok' if ok else 'bad'}'>{'PASSED' if ok else 'FAILED'}</span></h1>",
             f"<p class='muted'>format <code>{_e(report.get('format'))}</code> · scenario "
             f"<code>{_e(report.get('scenario'))}</code> · policy <code>{_e(report.get('policy'))}</code> · "
             f"max_seq_len {_e(report.get('max_seq_len'))}</p>"]
    counts = report.get("counts") or {}
    if counts:
        rows = [[_e(n), _e(c["read"]), _e(c["accepted"]), _e(c["rejected"]),
                 _e(", ".join(f"{k}: {v}" for k, v in c.get("rejected_by_rule", {}).items()) or "-")]
                for n, c in counts.items()]
        parts += ["<h2>Counts</h2>", _table(["split", "read", "accepted", "rejected", "rejected by rule"], rows)]
    suites = report.get("suites") or {}
    if suites:
        parts += ["<h2>Expectation suites</h2>",
                  _table(["suite", "version", "sha256"],
                         [[_e(v["name"]), _e(v["version"]), f"<code>{_e(v['sha256'])}</code>"] for v in suites.values()])]
    for name, split in (report.get("splits") or {}).items():
        parts.append(f"<h2>Split <code>{_e(name)}</code></h2>")
        parts.append(f"<p><code>{_e(split.get('path'))}</code> · md5 <code>{_e(split.get('md5'))}</code> · "
                     f"{_e(split.get('rows'))} rows · {_e(split.get('tokens'))} tokens (accepted rows)</p>")
        rows = []
        for exp in split.get("expectations") or []:
            kwargs = {k: v for k, v in (exp.get("kwargs") or {}).items()}
            lines = exp.get("unexpected_lines")
            rows.append([f"<code>{_e(exp.get('expectation'))}</code>", f"<code>{_e(kwargs)}</code>",
                         _e(f"{exp.get('field')}: {exp.get('rule')}"), _status(bool(exp.get("success"))),
                         _e(exp.get("observed")), _e(exp.get("unexpected_count")),
                         _e(", ".join(map(str, lines)) if lines else "")])
        parts.append(_table(["expectation", "arguments", "field: rule", "result", "observed", "unexpected",
                             "first unexpected lines"], rows) if rows else "<p class='muted'>not run</p>")
    problems = report.get("problems") or []
    parts.append(f"<h2>Problems ({_e(report.get('problem_count', len(problems)))})</h2>")
    parts.append(f"<pre>{_e(chr(10).join(problems))}</pre>" if problems else "<p class='ok'>none</p>")
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")
