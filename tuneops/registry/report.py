"""The run report: one self-contained HTML file per run (inline CSS and SVG, no scripts,
fonts or links to fetch, so it renders offline) with the validation summary, the plan
and its reasons, the loss curve, the evaluation table (base vs fine-tuned vs ONNX
variants), the variants with their gates (and target coverage when present) and the
lineage. ``register`` writes it to ``<register_dir>/report.html`` and logs it to the
run in MLflow; ``tuneops report`` rebuilds it from the stage outputs.
"""
from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

from tuneops.config import Config
from tuneops.io import read_json

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1000px;color:#1d2430;
padding:0 1rem;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;border-bottom:1px solid #d0d7de;padding-bottom:.2rem;
margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}th,td{border:1px solid #d0d7de;padding:.25rem .6rem;
text-align:left;vertical-align:top}th{background:#f3f5f7}
td.num{text-align:right;font-variant-numeric:tabular-nums}code{font-size:.85rem;background:#f3f5f7;padding:0 .2rem}
.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}.muted{color:#57606a}
svg{background:#fff;border:1px solid #d0d7de}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return _e(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _e(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _flag(ok: Any) -> str:
    return '<span class="ok">pass</span>' if ok else '<span class="bad">fail</span>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def loss_svg(history: list[dict[str, Any]], width: int = 640, height: int = 260) -> str:
    """The training loss per step as an inline SVG line chart (axes, ticks, labels)."""
    points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    if not points:
        return '<p class="muted">no loss was logged</p>'
    left, right, top, bottom = 56, 16, 16, 36
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    ticks = []
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        ticks.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(yv):.1f}" y2="{sy(yv):.1f}" stroke="#eaeef2"/>'
                     f'<text x="{left - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end" font-size="11">{yv:.2f}</text>')
        xv = x0 + (x1 - x0) * i / 4
        ticks.append(f'<text x="{sx(xv):.1f}" y="{height - bottom + 16}" text-anchor="middle" '
                     f'font-size="11">{xv:.0f}</text>')
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="#0969da"/>' for x, y in points)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" id="loss-curve" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="training loss per step">'
            + "".join(ticks)
            + f'<line x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}" stroke="#57606a"/>'
            f'<line x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}" stroke="#57606a"/>'
            f'<polyline fill="none" stroke="#0969da" stroke-width="2" points="{path}"/>{dots}'
            f'<text x="{(left + width - right) / 2}" y="{height - 4}" text-anchor="middle" font-size="12">step</text>'
            f'<text x="14" y="{(top + height - bottom) / 2}" text-anchor="middle" font-size="12" '
            f'transform="rotate(-90 14 {(top + height - bottom) / 2})">loss</text></svg>')


def collect(cfg: Config, registration: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report's data, from the stage outputs of this project."""
    reg_path = cfg.path("register_dir") / "registration.json"
    if registration is None and reg_path.is_file():
        registration = read_json(reg_path)
    history_path = cfg.path("train_dir") / "history.json"
    return {
        "validation": read_json(cfg.path("validation_dir") / "report.json"),
        "plan": read_json(cfg.path("plan")),
        "train": read_json(cfg.path("train_dir") / "metrics.json"),
        "history": read_json(history_path) if history_path.is_file() else [],
        "evaluate": read_json(cfg.path("evaluate_dir") / "metrics.json"),
        "optimize": read_json(cfg.path("optimize_dir") / "metrics.json"),
        "registration": registration or {},
    }


def render(data: dict[str, Any]) -> str:
    v, plan, tm, em, om, reg = (data[k] for k in ("validation", "plan", "train", "evaluate", "optimize",
                                                  "registration"))
    tags = reg.get("tags", {})
    title = f"{reg.get('model_name', 'tuneops')} v{reg.get('version', '?')}" if reg else "tuneops run"
    counts = v.get("counts") or {}
    count_rows = [[_e(s), _num(c.get("read")), _num(c.get("accepted")), _num(c.get("rejected")),
                   _e(", ".join(f"{r}: {n}" for r, n in (c.get("rejected_by_rule") or {}).items()) or "-")]
                  for s, c in counts.items()]
    reasons = [[_e(r.get("rule")), _e(r.get("text"))] if isinstance(r, dict) else ["", _e(r)]
               for r in plan.get("reasons", [])]
    variants = om.get("variants") or {}
    metric = em.get("primary_metric", "perplexity")      # a task head's: accuracy, entity F1
    change = (_num(em.get("perplexity_change_pct"), 2) + " % vs base" if metric == "perplexity"
              else _num(em.get(f"{metric}_change")) + " vs base")
    eval_rows = [["base (PyTorch)", _num(em.get(f"base_{metric}")), _num(em.get("base_loss")), "-"],
                 ["fine-tuned (PyTorch)", _num(em.get(f"finetuned_{metric}")), _num(em.get("finetuned_loss")), change]]
    eval_rows += [[f"fine-tuned ONNX {_e(n)}", _num(x.get("perplexity")), "-",
                   _num(x.get("perplexity_change_pct"), 2) + " % vs PyTorch" if "perplexity_change_pct" in x
                   else f"parity {_num(x.get('max_abs_logits_diff'), 6)}"] for n, x in variants.items()]
    grader_rows = [[_e(n), _e(g.get("type")), _num(g.get("n")), _num(g.get("base")), _num(g.get("finetuned")),
                    _num(_float(tags.get(f"gate.challenger.grader_{n}"))), _num(_float(tags.get(f"gate.champion.grader_{n}")))]
                   for n, g in (em.get("graders") or {}).items() if g.get("n")]
    graders_html = ("<h3>Graders (<code>evaluate.graders</code>)</h3>" + _table(
        ["grader", "type", "turns", "base", "fine-tuned", "this version (ONNX, at registration)", "champion (ONNX)"],
        grader_rows)) if grader_rows else ""
    var_rows = []
    for n, x in variants.items():
        cov = x.get("coverage")
        cov_text = (", ".join(f"{t}: {c.get('node_share', c) if isinstance(c, dict) else c}" for t, c in cov.items())
                    if isinstance(cov, dict) else _e(cov if cov is not None else "-"))
        var_rows.append([_e(n), _e(x.get("path")), f"{x.get('size_bytes', 0) / 2**20:.1f} MB", _flag(x.get("accepted")),
                         _e(x.get("gate")), _e(cov_text),
                         "default" if n == om.get("default_variant") else ""])
    lineage_rows = [[_e(k), f"<code>{_e(val)}</code>"] for k, val in [
        ("registered", f"{reg.get('model_uri')} alias {reg.get('alias')}" if reg else "not registered"),
        ("promotion", reg.get("reason")), ("git commit", tags.get("git.commit")),
        ("params hash", tags.get("params.hash")),
        ("train data", f"{tags.get('data.train.path')} md5 {tags.get('data.train.md5')}"),
        ("eval data", f"{tags.get('data.eval.path')} md5 {tags.get('data.eval.md5')}"),
        ("dvc.lock md5s", f"train {tags.get('dvc.lock.train.md5', '-')}, eval {tags.get('dvc.lock.eval.md5', '-')}"),
        ("base model", f"{tags.get('base_model.id')} hash {tags.get('base_model.hash')}"),
        ("MLflow run", reg.get("mlflow_run_id") or tm.get("mlflow_run_id")),
        ("Prefect flow run", tags.get("prefect.flow_run_id", "-")),
    ]]
    valid = v.get("success")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)} - tuneops run report</title><style>{_CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<p class="muted">tuneops run report, generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.
Alias <strong>{_e(reg.get('alias', '-'))}</strong>: {_e(reg.get('reason', ''))}</p>

<h2 id="validation">Data validation</h2>
<p>{_flag(valid)} scenario <code>{_e(v.get('scenario'))}</code>, format <code>{_e(v.get('format'))}</code>,
policy <code>{_e(v.get('policy'))}</code>, {_e(v.get('problem_count', 0))} problem(s),
{_e(v.get('train_tokens'))} training tokens.</p>
{_table(["split", "read", "accepted", "rejected", "rejected by rule"], count_rows)}

<h2 id="plan">Plan</h2>
<p>Method <strong>{_e(plan.get('method'))}</strong>, precision {_e(plan.get('precision'))}, ZeRO stage
{_e(plan.get('zero_stage'))}, micro-batch {_e(plan.get('micro_batch_size'))} x accumulation
{_e(plan.get('grad_accum'))} x world size {_e(plan.get('world_size'))}, launcher {_e(plan.get('launcher'))};
predicted peak {_num(plan.get('predicted_peak_gb_per_device'), 3)} GB per device (fits: {_e(plan.get('fits'))}).</p>
{_table(["rule", "why"], reasons)}

<h2 id="training">Training</h2>
<p>{_e(tm.get('steps'))} steps, final loss {_num(tm.get('final_loss'))}, {_num(tm.get('tokens_per_s'), 1)} tokens/s,
{_num(tm.get('runtime_s'), 1)} s.</p>
{loss_svg(data.get("history") or [])}

<h2 id="evaluation">Evaluation (held-out split, {_e(em.get('samples'))} samples)</h2>
{_table(["model", metric, "loss", "change"], eval_rows)}
{graders_html}

<h2 id="variants">ONNX variants</h2>
{_table(["variant", "path", "size", "gate", "rule", "target coverage", ""], var_rows)}

<h2 id="lineage">Lineage</h2>
{_table(["field", "value"], lineage_rows)}
</body></html>
"""


def write(cfg: Config, registration: dict[str, Any] | None = None, out: Path | None = None) -> Path:
    out = out or cfg.path("register_dir") / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(collect(cfg, registration)), encoding="utf-8")
    return out
