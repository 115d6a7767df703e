"""The audit report: JSON for machines and a self-contained HTML page (images inlined as
data URIs, no external resources) that each stage extends through its summary.

Stage summaries follow a few conventions the renderer knows: ``labels`` (per-label
table), ``layers`` (per-layer table), ``before``/``after`` (comparison), ``evidence``,
``images`` (name -> artifact reference of a PNG in the store); other scalars are listed.
"""

from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import asdict
from typing import Any

from modelguard.errors import ModelGuardError
from modelguard.services.pruning_orchestrator.state import AuditRecord
from modelguard.store.base import ArtifactStore

STATE_COLOURS = {
    "done": "#1a7f37",
    "succeeded": "#1a7f37",
    "failed": "#cf222e",
    "skipped": "#6e7781",
    "not_run": "#6e7781",
    "running": "#9a6700",
    "pending": "#9a6700",
    "queued": "#9a6700",
}


def build_report(
    record: AuditRecord, store: ArtifactStore, finished_at: float | None = None
) -> tuple[bytes, bytes]:
    """``finished_at`` (default: now) is the only input besides the record: the same
    record gives the same bytes, hence the same content-addressed report."""
    document = report_document(record, finished_at)
    return json.dumps(document, indent=2, sort_keys=True).encode(), render_html(
        document, store
    ).encode()


def report_document(record: AuditRecord, finished_at: float | None = None) -> dict[str, Any]:
    failed = [s.name for s in record.stages.values() if s.state == "failed"]
    return {
        "audit_id": record.audit_id,
        "state": "failed" if failed else "succeeded",
        "created_at": record.created_at,
        "finished_at": time.time() if finished_at is None else finished_at,
        "model": record.model,
        "options": record.options,
        "stages": {
            name: {
                "state": stage.state,
                "message": stage.message,
                "error": stage.error,
                "error_code": stage.error_code,
                "summary": stage.summary,
                "result": asdict(stage.result) if stage.result else None,
            }
            for name, stage in record.stages.items()
        },
        "verdicts": verdicts(record),
    }


def verdicts(record: AuditRecord) -> dict[str, str]:
    """One line per question a user asks: infected? repaired? leaking?"""
    out: dict[str, str] = {}
    for name, stage in record.stages.items():
        verdict = stage.summary.get("verdict")
        out[name] = str(verdict) if verdict else stage.state
    return out


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) > 12:
        return _esc(", ".join(map(_fmt_plain, value[:12])) + f", … ({len(value)} in all)")
    if isinstance(value, list):
        return _esc(", ".join(map(_fmt_plain, value)))
    if isinstance(value, dict):
        return _esc(json.dumps(value)[:200])
    return _esc(value)


def _fmt_plain(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(rows: list[dict[str, Any]], limit: int = 200) -> str:
    if not rows:
        return ""
    columns = list(rows[0].keys())
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(row.get(c, ''))}</td>" for c in columns) + "</tr>"
        for row in rows[:limit]
    )
    more = f"<p>… {len(rows) - limit} more rows in the JSON report</p>" if len(rows) > limit else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def _image(store: ArtifactStore, name: str, ref: dict[str, Any]) -> str:
    try:
        data = store.get_blob(str(ref["sha256"]))
    except (ModelGuardError, KeyError) as err:
        return f"<p>image {_esc(name)} unavailable: {_esc(err)}</p>"
    encoded = base64.b64encode(data).decode()
    return (
        f'<figure><img alt="{_esc(name)}" src="data:image/png;base64,{encoded}">'
        f"<figcaption>{_esc(name)}</figcaption></figure>"
    )


def _stage_section(name: str, stage: dict[str, Any], store: ArtifactStore) -> str:
    state = stage["state"]
    colour = STATE_COLOURS.get(state, "#6e7781")
    parts = [
        f'<section><h2>{_esc(name)} <span class="badge" style="background:{colour}">'
        f"{_esc(state.replace('_', ' '))}</span></h2>"
    ]
    if state == "not_run":
        parts.append("<p>This stage did not run for this audit.</p>")
    if stage.get("message"):
        parts.append(f"<p>{_esc(stage['message'])}</p>")
    if stage.get("error"):
        parts.append(f'<p class="error">{_esc(stage["error_code"])}: {_esc(stage["error"])}</p>')
    summary: dict[str, Any] = stage.get("summary") or {}
    scalars = {
        k: v
        for k, v in summary.items()
        if not isinstance(v, (dict, list))
        or (isinstance(v, list) and v and not isinstance(v[0], dict))
    }
    if scalars:
        items = "".join(f"<dt>{_esc(k)}</dt><dd>{_fmt(v)}</dd>" for k, v in scalars.items())
        parts.append(f"<dl>{items}</dl>")
    if "before" in summary and "after" in summary:
        keys = sorted(set(summary["before"]) | set(summary["after"]))
        rows = [
            {"measure": k, "before": summary["before"].get(k), "after": summary["after"].get(k)}
            for k in keys
        ]
        parts.append("<h3>Before and after</h3>" + _table(rows))
    for key, title in (
        ("labels", "Per label"),
        ("layers", "Per layer"),
        ("evidence", "Evidence"),
        ("pruned", "Pruned neurons"),
        ("curve", "Pruning curve"),
        ("neurons", "Top neurons"),
    ):
        value = summary.get(key)
        if isinstance(value, list) and value and isinstance(value[0], dict):
            parts.append(f"<h3>{title}</h3>" + _table(value))
    images = summary.get("images") or {}
    if images:
        parts.append('<div class="images">')
        parts.extend(_image(store, k, v) for k, v in images.items())
        parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)


def render_html(document: dict[str, Any], store: ArtifactStore) -> str:
    created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(document["created_at"]))
    model = document.get("model", {})
    verdict_rows = [{"stage": k, "verdict": v} for k, v in document["verdicts"].items()]
    sections = "".join(
        _stage_section(name, stage, store) for name, stage in document["stages"].items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>ModelGuard audit {_esc(document["audit_id"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #1f2328; }}
table {{ border-collapse: collapse; margin: .5rem 0; font-size: .9rem; }}
th, td {{ border: 1px solid #d0d7de; padding: .25rem .6rem; text-align: right; }}
th {{ background: #f6f8fa; }}
.badge {{ color: white; border-radius: .6rem; padding: .1rem .6rem; font-size: .8rem; }}
.error {{ color: #cf222e; }}
dl {{ display: grid; grid-template-columns: max-content auto; gap: .2rem 1rem; }}
dt {{ font-weight: 600; }}
.images {{ display: flex; flex-wrap: wrap; gap: 1rem; }}
figure img {{ image-rendering: pixelated; min-width: 112px; max-width: 420px; }}
section {{ border-top: 1px solid #d0d7de; margin-top: 1.5rem; }}
</style></head><body>
<h1>ModelGuard audit {_esc(document["audit_id"])}</h1>
<p>State: <b>{_esc(document["state"])}</b> · submitted {created} ·
model format {_esc(model.get("format", "?"))} {_esc(model.get("arch", ""))}</p>
<h2>Verdicts</h2>{_table(verdict_rows)}
{sections}
</body></html>
"""
