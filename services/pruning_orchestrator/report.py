"""The audit report: JSON for machines and a self-contained HTML page for people (images
inlined as data URIs, no scripts, no external resources).

The page answers first: a summary with one verdict per stage in words and colour, the
flagged labels, the before → after figures and what to do next; then pictures (reversed
triggers, the MAD chart, the pruning curve, the leak evidence, robust accuracy against
ε with the gradient-masking check's findings as sentences); the raw figures stay
folded in ``<details>`` under human names. It fits a 1280-pixel page and prints cleanly.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from modelguard.detection.render import image_name
from modelguard.errors import ModelGuardError
from modelguard.plots import (
    bar_chart_png,
    mad_chart_png,
    pruning_curve_png,
    robustness_curve_png,
)
from modelguard.robustness import FRAGILE, MASKED_GRADIENTS, ROBUST, ROBUST_ACCURACY_FLOOR
from modelguard.services.pruning_orchestrator.state import AuditRecord
from modelguard.store.base import ArtifactStore


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


# ---------------------------------------------------------------- words and colours

#: Tones of a verdict and their colours (GitHub's accessible palette).
TONE_COLOURS = {"bad": "#cf222e", "good": "#1a7f37", "warn": "#9a6700", "neutral": "#6e7781"}

#: The tone of every verdict and stage state a report can show.
VERDICT_TONES = {
    "infected": "bad",
    "leak": "bad",
    "failed": "bad",
    "clean": "good",
    "benign": "good",
    "repaired": "good",
    "done": "good",
    "succeeded": "good",
    "partially repaired": "warn",
    ROBUST: "good",
    FRAGILE: "bad",
    MASKED_GRADIENTS: "warn",
    "inconclusive": "warn",
    "running": "warn",
    "pending": "warn",
    "queued": "warn",
    "skipped": "neutral",
    "not_run": "neutral",
}

#: Stage names as a reader knows them.
STAGE_TITLES = {
    "leak-detector": "Training-data leak",
    "trigger-reversal": "Backdoor (reversed triggers)",
    "neuron-scoring": "Neuron scoring",
    "repair": "Repair",
    "robustness": "Robustness to evasion attacks",
}

#: Human names of the summaries' fields (stage summaries, per-label, per-layer, pruning
#: steps and model fields); a field not listed gets its key with spaces.
FIELD_NAMES = {
    # trigger reversal
    "verdict": "Verdict",
    "flagged": "Flagged target labels",
    "suspects": "Suspect labels (refined)",
    "detector": "Detector",
    "steps": "Optimisation steps",
    "evaluations": "Model evaluations",
    "seconds": "Time (s)",
    "value_range": "Input value range",
    "trigger_labels": "Labels with a reversed trigger",
    "triggers": "Reversed triggers (artifact)",
    "label": "Label",
    "l1_norm": "Trigger size (L1 norm)",
    "anomaly_index": "Anomaly index",
    "attack_success": "Trigger success",
    "reached_threshold": "Trigger found",
    "refined": "Refined",
    "trigger_norm": "Returned trigger size",
    "index_min": "Smallest anomaly index",
    "index_median": "Median anomaly index",
    "optimised": "Optimised",
    "summary": "Summary",
    "median_norm": "Median trigger size",
    "threshold": "Threshold",
    "screening_runs": "Screening runs",
    "rejected_at_recheck": "Rejected at re-check",
    "run_flags": "Flags per screening run",
    "rule": "Decision rule",
    "norm_ratio": "Trigger size / median",
    "max_norm_ratio": "Largest size ratio flagged",
    "labels_optimised": "Labels optimised",
    "screening_steps": "Screening steps",
    "images_per_pass": "Images per pass",
    "weight_layout": "Weight layout",
    "seed": "Seed",
    "norms": "Trigger sizes",
    "mad": "Dispersion (MAD)",
    "median": "Median",
    "reason": "Reason",
    # repair
    "mode": "Repair mode",
    "layer": "Layer",
    "target_labels": "Target labels",
    "pruned": "Pruned neurons",
    "curve": "Pruning steps",
    "neurons": "Neurons",
    "pruned_fraction": "Share of the layer pruned",
    "finetune_steps": "Fine-tuning steps",
    "probe_mode": "Probe mode",
    "notes": "Notes",
    "shapley_values": "Shapley values",
    "repaired_model": "Repaired model (artifact)",
    "step": "Step",
    "index": "Neuron",
    "asr": "Attack success",
    "agreement": "Agreement with the original",
    "action": "Action",
    "reversed_asr": "Attack success of the reversed trigger",
    "real_asr": "Attack success of the real trigger",
    "accuracy": "Clean accuracy",
    "per_trigger_asr": "Attack success per trigger",
    "soft_asr": "Soft attack success",
    # neuron scoring
    "neuron_count": "Neurons ranked",
    "top_by_activation": "Top neurons by activation",
    "top_by_weight": "Top neurons by weight",
    "model_evaluations": "Model evaluations",
    "data_split": "Data split",
    "activation": "Activation",
    "weight": "Weight",
    "shapley": "Shapley value",
    "shapley_ci": "Shapley confidence interval",
    # leak detector
    "score": "Leak score",
    "evidence": "Evidence",
    "layers": "Per-layer statistics",
    "kind": "Layer kind",
    "feature": "Feature",
    "value": "Value",
    "excess": "Excess over sampling noise",
    "bound": "Largest benign excess",
    "shape": "Shape",
    "count": "Weights",
    "min": "Minimum",
    "max": "Maximum",
    "mean": "Mean",
    "variance": "Variance",
    "skewness": "Skewness",
    "kurtosis": "Kurtosis",
    "tail_fraction": "Share in the tails",
    "positive_fraction": "Share positive",
    "sign_autocorrelation": "Sign autocorrelation",
    "autocorrelation": "Autocorrelation",
    "autocorrelation_lag": "Autocorrelation lag",
    "quantile_skewness": "Quantile skewness",
    "neighbour_cokurtosis": "Neighbour co-kurtosis",
    "positive_fraction_stderr": "Share positive (std. error)",
    "zero_fraction": "Share zero",
    "units": "Units",
    "nonfinite": "Non-finite weights",
    "sampled": "Weights sampled",
    "sign_imbalance": "Sign imbalance",
    "negative_cokurtosis": "Negative co-kurtosis",
    # robustness
    "eps": "ε",
    "targeted": "Targeted attacks",
    "max_images": "Images attacked at most",
    "masking_check": "Gradient-masking check",
    "memory_mb": "Memory budget (MB)",
    "time_seconds": "Time budget (s)",
    "clean_accuracy": "Clean accuracy",
    "points": "Accuracy per ε",
    "robust_accuracy": "Robust accuracy",
    "success_rate": "Attack success",
    "masking": "Gradient-masking check",
    "masking_flagged": "Flagged",
    "reasons": "Findings",
    "fgsm": "FGSM accuracy",
    "pgd": "PGD accuracy",
    "pgd-strong": "Stronger PGD accuracy",
    "zero_gradient_fraction": "Share of images with a zero gradient",
    "unbounded_accuracy": "Accuracy under an unbounded attack",
    "batch_size": "Images per pass",
    "out_of_time": "Ran out of time",
    "robust_accuracy_floor": "Robust from (accuracy at the largest ε)",
    # stage and model
    "state": "State",
    "message": "Message",
    "error": "Error",
    "error_code": "Error code",
    "arch": "Architecture",
    "format": "Model format",
    "num_classes": "Classes",
}

#: Enum values of the model specification (protobuf JSON) → their meaning.
_ENUM_PREFIXES = ("MODEL_FORMAT_", "STAGE_STATE_")


def field_name(key: str) -> str:
    """The human name of a summary field: ``"l1_norm"`` → ``"Trigger size (L1 norm)"``."""
    return FIELD_NAMES.get(key) or key.replace("_", " ").replace("-", " ").capitalize()


def human_value(value: Any) -> str:
    """A value as a reader wants it: ``MODEL_FORMAT_SAFETENSORS`` → ``safetensors``,
    floats to 4 significant digits, booleans as yes/no, long lists shortened."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        for prefix in _ENUM_PREFIXES:
            if value.startswith(prefix):
                return value[len(prefix) :].lower().replace("_", " ")
        return value
    if value is None:
        return "–"
    if isinstance(value, list):
        shown = ", ".join(human_value(v) for v in value[:12])
        return shown + (f", … ({len(value)} in all)" if len(value) > 12 else "")
    if isinstance(value, dict):
        return "; ".join(f"{field_name(str(k))}: {human_value(v)}" for k, v in value.items())
    return str(value)


def _percent(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "–"


@dataclass(frozen=True)
class StageVerdict:
    """What the summary says of one stage: ``word`` (infected, clean, leak, …), its
    ``tone`` (a `TONE_COLOURS` key) and a sentence."""

    stage: str
    word: str
    tone: str
    sentence: str

    @property
    def colour(self) -> str:
        return TONE_COLOURS[self.tone]


def stage_verdict(name: str, stage: dict[str, Any]) -> StageVerdict:
    """The verdict of stage ``name`` from its report entry (state, error, summary)."""
    state = str(stage.get("state", ""))
    summary: dict[str, Any] = stage.get("summary") or {}
    word = str(summary.get("verdict") or state).replace("_", " ")
    tone = VERDICT_TONES.get(str(summary.get("verdict") or state), "neutral")
    if state == "failed":
        code = stage.get("error_code") or "error"
        sentence = f"The stage failed ({code}): {stage.get('error') or 'no detail'}."
        return StageVerdict(name, "failed", "bad", sentence)
    if state in ("not_run", "skipped"):
        return StageVerdict(name, word, "neutral", "This stage did not run for this audit.")
    if state != "done":
        return StageVerdict(name, word, tone, "This stage had not finished.")
    return StageVerdict(name, word, tone, _sentence(name, word, summary))


def _sentence(name: str, word: str, summary: dict[str, Any]) -> str:
    if name == "leak-detector":
        score, threshold = summary.get("score"), summary.get("threshold")
        figures = f"score {human_value(score)}, flagged from {human_value(threshold)}"
        if word == "leak":
            layers = sorted({str(e["layer"]) for e in summary.get("evidence") or []})
            where = ", ".join(layers) or "some layers"
            return f"The weights of {where} look like they encode training data ({figures})."
        return f"No sign of training data encoded in the weights ({figures})."
    if name == "trigger-reversal":
        flagged = summary.get("flagged") or []
        if word == "infected":
            return (
                f"Label{'s' if len(flagged) > 1 else ''} {human_value(flagged)} can be reached "
                "with an abnormally small trigger: a backdoor targets "
                f"{'them' if len(flagged) > 1 else 'it'}."
            )
        if word == "clean":
            return "No label can be reached with an abnormally small trigger."
        return str((summary.get("evidence") or {}).get("summary") or "The test could not decide.")
    if name == "repair":
        before, after = summary.get("before") or {}, summary.get("after") or {}
        pruned = len(summary.get("pruned") or [])
        layer = summary.get("layer", "the layer")
        done = f"Pruned {pruned} neuron{'s' if pruned != 1 else ''} of {layer}"
        if summary.get("edit"):
            what = f"edited {summary['edit']}"
            done = f"{done} and {what}" if pruned else f"Pruned nothing and {what}"
        return (
            f"{done}: the reversed trigger's success went from "
            f"{_percent(before.get('reversed_asr'))} to {_percent(after.get('reversed_asr'))}, "
            f"clean accuracy from {_percent(before.get('accuracy'))} to "
            f"{_percent(after.get('accuracy'))}."
        )
    if name == "robustness":
        return _robustness_sentence(word, summary)
    if name == "neuron-scoring" and "neuron_count" in summary:
        return f"Ranked {summary['neuron_count']} neurons of {summary.get('layer', '?')}."
    return "Done."


def _robustness_sentence(word: str, summary: dict[str, Any]) -> str:
    points = summary.get("points") or []
    if not points:
        return "Done."
    largest = points[-1]
    norm = "L∞" if summary.get("norm", "linf") == "linf" else "L2"
    figures = (
        f"{_percent(largest.get('robust_accuracy'))} of the images stay correct under every "
        f"attack at ε = {human_value(largest.get('eps'))} ({norm}; clean accuracy "
        f"{_percent(summary.get('clean_accuracy'))})"
    )
    floor = _percent(summary.get("robust_accuracy_floor", ROBUST_ACCURACY_FLOOR))
    if word == MASKED_GRADIENTS:
        return (
            f"{figures[0].upper()}{figures[1:]}, but the gradient-masking check flagged the "
            "evaluation: these figures are an upper bound nobody should rely on."
        )
    if word == FRAGILE:
        return f"Small perturbations fool the model: only {figures}, under the {floor} floor."
    return f"The model resists these attacks: {figures}, at least the {floor} floor."


def next_steps(document: dict[str, Any]) -> list[str]:
    """What the reader should do, from the stages' verdicts."""
    stages: dict[str, dict[str, Any]] = document["stages"]
    verdicts = {name: stage_verdict(name, stage) for name, stage in stages.items()}
    steps: list[str] = []
    infected = verdicts.get("trigger-reversal")
    repair = stages.get("repair") or {}
    repaired_model = (repair.get("summary") or {}).get("repaired_model")
    if infected is not None and infected.word == "infected":
        if repaired_model:
            repaired = verdicts["repair"]
            steps.append(
                "Download the repaired model (artifact "
                f"{str(repaired_model.get('sha256', ''))[:16]}…) and do not deploy the original."
            )
            if repaired.word != "repaired":
                steps.append(
                    "The repair lowered the attack only partly: test the repaired model before use."
                )
        else:
            steps.append("Do not deploy this model: it is backdoored and was not repaired.")
    if verdicts.get("leak-detector") and verdicts["leak-detector"].word == "leak":
        steps.append(
            "Do not publish the weights: they may carry training data. Retrain with a "
            "trusted training pipeline."
        )
    robustness = verdicts.get("robustness")
    if robustness is not None and robustness.word == FRAGILE:
        steps.append(
            "Do not deploy where inputs can be manipulated: evasion attacks within the tested "
            "ε fool the model. Adversarial training (Madry et al., 2018) is the usual remedy."
        )
    elif robustness is not None and robustness.word == MASKED_GRADIENTS:
        steps.append(
            "Do not trust the robustness figures: the model's gradients mislead the attacks. "
            "Evaluate again with gradient-free or adaptive attacks before relying on them."
        )
    failed = [STAGE_TITLES.get(v.stage, v.stage) for v in verdicts.values() if v.word == "failed"]
    if failed:
        steps.append(f"Run the audit again: {', '.join(failed)} failed, so it is incomplete.")
    if not steps:
        steps.append("No problem found by these tests: the model may be deployed.")
    return steps


# ---------------------------------------------------------------- HTML pieces


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _figure(data: bytes, caption: str, css: str = "") -> str:
    return (
        f'<figure class="{css}"><img alt="{_esc(caption)}" src="{_png_uri(data)}">'
        f"<figcaption>{_esc(caption)}</figcaption></figure>"
    )


def _table(rows: list[dict[str, Any]], limit: int = 500) -> str:
    if not rows:
        return ""
    columns = list(dict.fromkeys(key for row in rows[:limit] for key in row))
    head = "".join(f"<th>{_esc(field_name(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_esc(human_value(row.get(c, '')))}</td>" for c in columns) + "</tr>"
        for row in rows[:limit]
    )
    more = f"<p>… {len(rows) - limit} more rows in the JSON report</p>" if len(rows) > limit else ""
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>{more}"
    )


def _fields(values: dict[str, Any]) -> str:
    items = "".join(
        f"<dt>{_esc(field_name(k))}</dt><dd>{_esc(human_value(v))}</dd>" for k, v in values.items()
    )
    return f"<dl>{items}</dl>" if items else ""


def _raw(summary: dict[str, Any]) -> str:
    """Every figure of a stage, folded: fields, then one folded table per list of rows."""
    rows = {
        k: v for k, v in summary.items() if isinstance(v, list) and v and isinstance(v[0], dict)
    }
    pictures = "images" if isinstance(summary.get("images"), dict) else None
    nested = {k: v for k, v in summary.items() if isinstance(v, dict) and k != pictures}
    scalars = {
        k: v for k, v in summary.items() if k not in rows and k not in nested and k != pictures
    }
    parts = [_fields(scalars)]
    parts.extend(f"<h4>{_esc(field_name(k))}</h4>{_fields(v)}" for k, v in nested.items())
    parts.extend(
        f"<details><summary>{_esc(field_name(k))} ({len(v)} rows)</summary>{_table(v)}</details>"
        for k, v in rows.items()
    )
    return f'<details class="raw"><summary>All figures</summary>{"".join(parts)}</details>'


def _blob(store: ArtifactStore, ref: Any) -> bytes | None:
    try:
        return store.get_blob(str(ref["sha256"]))
    except (ModelGuardError, KeyError, TypeError):
        return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (summaries write NaN as null)."""
    return float(value) if _finite(value) else None


# ---------------------------------------------------------------- charts


def mad_chart(summary: dict[str, Any]) -> tuple[bytes, str] | None:
    """The MAD chart of a reversal summary and its caption: the trigger size of every
    optimised label (labels a triage left out have none and are counted instead), the
    median and the size below which a label is flagged (from the first screening run)."""
    rows = [r for r in summary.get("labels") or [] if _finite(r.get("l1_norm"))]
    if not rows:
        return None
    total = len(summary.get("labels") or [])
    evidence = summary.get("evidence") or {}
    config = summary.get("config") or {}
    runs = summary.get("restarts") or []
    first = runs[0] if runs else {}
    norms = [float(r["l1_norm"]) for r in rows]
    median = _number(first.get("median"))
    if median is None:
        median = _number(evidence.get("median_norm"))
    if median is None:
        median = float(statistics.median(norms))
    threshold, dispersion = _number(evidence.get("threshold")), _number(first.get("mad"))
    flag_line = None
    if threshold is not None and dispersion is not None and dispersion > 0:
        if config.get("norm_scale", "linear") == "log":
            flag_line = math.exp(math.log(median) - threshold * dispersion)
        else:
            flag_line = median - threshold * dispersion
    png = mad_chart_png(
        [int(r["label"]) for r in rows],
        norms,
        set(summary.get("flagged") or []),
        median=median,
        flag_line=flag_line,
        title="Trigger size per label (red: flagged)",
    )
    caption = (
        "Smallest trigger that flips clean images to each label; a backdoored label needs a "
        "far smaller one than the others."
    )
    if total > len(rows):
        caption += (
            f" {len(rows)} of {total} labels were optimised; {total - len(rows)} were "
            "triaged out (or found no trigger) and are not drawn."
        )
    return png, caption


def curve_png(curve: list[dict[str, Any]], title: str = "") -> bytes:
    """The pruning curve of a repair summary's ``curve`` steps: the x axis counts the
    neurons pruned when a step was measured (the kept ones before it, plus its own)."""
    pruned: list[int] = []
    kept = 0
    for step in curve:
        pruned.append(kept + 1)
        if step.get("action") != "rolled_back":
            kept += 1
    return pruning_curve_png(
        pruned,
        [float(s.get("asr", 0.0)) for s in curve],
        [float(s.get("agreement", 0.0)) for s in curve],
        [s.get("action") == "rolled_back" for s in curve],
        title=title,
    )


def leak_charts(summary: dict[str, Any]) -> list[tuple[bytes, str]]:
    """One small chart per layer in the evidence (score per feature against the verdict
    threshold) and the sentence saying what it means."""
    threshold = _number(summary.get("threshold"))
    by_layer: dict[str, list[dict[str, Any]]] = {}
    for item in summary.get("evidence") or []:
        by_layer.setdefault(str(item.get("layer")), []).append(item)
    charts = []
    for layer, items in by_layer.items():
        png = bar_chart_png(
            [field_name(str(i.get("feature"))) for i in items],
            [float(i.get("score", 0.0)) for i in items],
            threshold=threshold,
            threshold_label="leak threshold",
            xlabel="leak score",
            title=layer,
        )
        top = max(items, key=lambda i: float(i.get("score", 0.0)))
        over = threshold is not None and float(top.get("score", 0.0)) >= threshold
        kind = top.get("kind") or "such"
        sentence = (
            f"In {layer}, {field_name(str(top.get('feature'))).lower()} lies "
            f"{float(top.get('score', 0.0)):.2f}× as far beyond sampling noise as in the most "
            f"extreme benign {kind} layer. "
            + (
                "That is over the threshold: weights shaped like this are how a training "
                "procedure hides data in a model (Song et al., CCS 2017)."
                if over
                else "That is under the threshold: nothing suspicious."
            )
        )
        charts.append((png, sentence))
    return charts


# ---------------------------------------------------------------- sections


def _trigger_pictures(summary: dict[str, Any], store: ArtifactStore) -> str:
    images: dict[str, Any] = summary.get("images") or {}
    out = []
    for label in summary.get("flagged") or []:
        figures = []
        for part, caption in (
            ("mask", "mask"),
            ("pattern", "pattern"),
            ("trigger", "trigger"),
            ("clean", "clean image"),
            ("stamped", "same image stamped"),
        ):
            data = _blob(store, images.get(image_name(int(label), part)))
            if data is not None:
                figures.append(_figure(data, caption, "small"))
        if figures:
            out.append(
                f"<h3>Reversed trigger of label {_esc(label)}</h3>"
                f'<div class="images">{"".join(figures)}</div>'
            )
    return "".join(out)


def _stage_pictures(name: str, summary: dict[str, Any], store: ArtifactStore) -> str:
    parts: list[str] = []
    if name == "trigger-reversal":
        chart = mad_chart(summary)
        if chart:
            parts.append(_figure(*chart, css="chart"))
        parts.append(_trigger_pictures(summary, store))
    elif name == "repair" and summary.get("curve"):
        rolled = sum(1 for s in summary["curve"] if s.get("action") == "rolled_back")
        parts.append(
            _figure(
                curve_png(summary["curve"], f"{summary.get('mode', '')} pruning".strip()),
                f"Pruning curve: {len(summary['curve'])} steps, {rolled} rolled back (crosses).",
                css="chart",
            )
        )
    elif name == "leak-detector":
        parts.extend(
            f'<div class="leak">{_figure(png, "", css="chart")}<p>{_esc(text)}</p></div>'
            for png, text in leak_charts(summary)
        )
    elif name == "robustness" and summary.get("points"):
        parts.append(_robustness_pictures(summary))
    pictures = summary.get("images")
    if name != "trigger-reversal" and isinstance(pictures, dict):
        # other stages' own pictures (the curve is redrawn above)
        for key, ref in pictures.items():
            data = _blob(store, ref)
            if key != "curve" and data is not None:
                parts.append(_figure(data, field_name(key), "chart"))
    return "".join(parts)


def _robustness_pictures(summary: dict[str, Any]) -> str:
    """Robust accuracy against ε (per attack and combined) and the masking check's
    findings, one sentence each."""
    attacks = ", ".join(
        dict.fromkeys(str(a.get("attack")) for p in summary["points"] for a in p.get("attacks", []))
    )
    kind = "targeted" if summary.get("targeted") else "untargeted"
    caption = (
        f"Accuracy against ε under {kind} {attacks} ({human_value(summary.get('images'))} "
        "images); the thick red line counts an image only when every attack at that ε and "
        "every smaller one failed."
    )
    parts = [_figure(robustness_curve_png(summary, "Robust accuracy against ε"), caption, "chart")]
    masking = summary.get("masking") or {}
    reasons = [str(r) for r in masking.get("reasons") or []]
    if reasons:
        items = "".join(f"<li>{_esc(r[0].upper() + r[1:])}.</li>" for r in reasons)
        parts.append(
            "<h3>Gradient masking?</h3><p>The sanity check (Athalye, Carlini and Wagner, "
            "ICML 2018) found signs that the gradients mislead the attacks:</p>"
            f"<ul>{items}</ul>"
        )
    elif masking:
        parts.append(
            "<p>Gradient-masking check: passed (stronger attacks did at least as well as "
            "weaker ones, accuracy fell with ε, and an unbounded attack won).</p>"
        )
    notes = [str(n) for n in summary.get("notes") or []]
    if notes:
        parts.append("".join(f'<p class="muted">Note: {_esc(n)}.</p>' for n in notes))
    return "".join(parts)


def _raw_view(name: str, summary: dict[str, Any]) -> dict[str, Any]:
    """The summary as the folded figures show it: a robustness summary's per-ε rows get
    one column per attack's accuracy (their success rates stay in the JSON report), and
    the masking check's ``flagged`` its own name (it is not the flagged labels)."""
    if name != "robustness":
        return summary
    view = dict(summary)
    view["points"] = [
        {
            "eps": p.get("eps"),
            "robust_accuracy": p.get("robust_accuracy"),
            **{str(a.get("attack")): a.get("accuracy") for a in p.get("attacks") or []},
        }
        for p in summary.get("points") or []
    ]
    masking = dict(summary.get("masking") or {})
    if "flagged" in masking:
        masking["masking_flagged"] = masking.pop("flagged")
    view["masking"] = masking
    return view


def _stage_section(name: str, stage: dict[str, Any], store: ArtifactStore) -> str:
    verdict = stage_verdict(name, stage)
    summary: dict[str, Any] = stage.get("summary") or {}
    parts = [
        f'<section id="stage-{_esc(name)}"><h2>{_esc(STAGE_TITLES.get(name, name))} '
        f'<span class="badge" style="background:{verdict.colour}">{_esc(verdict.word)}</span>'
        f"</h2><p>{_esc(verdict.sentence)}</p>"
    ]
    if stage.get("message"):
        parts.append(f'<p class="muted">{_esc(stage["message"])}</p>')
    parts.append(_stage_pictures(name, summary, store))
    if summary:
        parts.append(_raw(_raw_view(name, summary)))
    parts.append("</section>")
    return "".join(parts)


def _summary_section(document: dict[str, Any]) -> str:
    stages: dict[str, dict[str, Any]] = document["stages"]
    chips = "".join(
        f'<li><span class="badge" style="background:{v.colour}">{_esc(v.word)}</span> '
        f"<b>{_esc(STAGE_TITLES.get(name, name))}</b>: {_esc(v.sentence)}</li>"
        for name, v in ((n, stage_verdict(n, s)) for n, s in stages.items())
    )
    reversal = (stages.get("trigger-reversal") or {}).get("summary") or {}
    repair = (stages.get("repair") or {}).get("summary") or {}
    flagged = reversal.get("flagged") or repair.get("target_labels") or []
    labels = (
        f"<p><b>Flagged target labels:</b> {_esc(human_value(flagged))}</p>"
        if flagged
        else "<p><b>Flagged target labels:</b> none</p>"
    )
    comparison = ""
    before, after = repair.get("before") or {}, repair.get("after") or {}
    keys = [k for k in ("real_asr", "reversed_asr", "accuracy", "agreement") if k in before]
    if keys:
        rows = "".join(
            f"<tr><th>{_esc(field_name(k))}</th><td>{_percent(before.get(k))}</td>"
            f"<td>→</td><td>{_percent(after.get(k))}</td></tr>"
            for k in keys
        )
        comparison = (
            '<table class="compare"><thead><tr><th></th><th>Original</th><th></th>'
            f"<th>Repaired</th></tr></thead><tbody>{rows}</tbody></table>"
        )
    todo = "".join(f"<li>{_esc(step)}</li>" for step in next_steps(document))
    return (
        f'<section id="summary" class="summary"><h2>Summary</h2><ul class="verdicts">{chips}'
        f"</ul>{labels}{comparison}<h3>What to do next</h3><ol>{todo}</ol></section>"
    )


_STYLE = """
* { box-sizing: border-box; }
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1200px;
  padding: 0 1rem; color: #1f2328; line-height: 1.4; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
.muted { color: #57606a; }
.summary { border: 2px solid #d0d7de; border-radius: .5rem; padding: .5rem 1.2rem 1rem; }
.verdicts { list-style: none; padding: 0; }
.verdicts li { margin: .35rem 0; }
.badge { color: white; border-radius: .6rem; padding: .1rem .6rem; font-size: .85rem;
  font-weight: 600; white-space: nowrap; -webkit-print-color-adjust: exact;
  print-color-adjust: exact; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .85rem; }
th, td { border: 1px solid #d0d7de; padding: .2rem .5rem; text-align: right; }
th { background: #f6f8fa; }
.compare td, .compare th { font-size: 1rem; }
.scroll { max-width: 100%; overflow-x: auto; }
dl { display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: .2rem 1rem; }
dt { font-weight: 600; }
dd { margin: 0; overflow-wrap: anywhere; }
.images { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: .5rem 0; break-inside: avoid; }
figure img { max-width: 100%; height: auto; }
figure.small img { width: 112px; image-rendering: pixelated; }
figcaption { font-size: .85rem; color: #57606a; max-width: 700px; }
.leak { display: flex; flex-wrap: wrap; gap: 1rem; align-items: center; }
.leak p { flex: 1 1 20rem; }
section { border-top: 1px solid #d0d7de; margin-top: 1.5rem; }
details { margin: .4rem 0; }
summary { cursor: pointer; color: #0969da; }
@media print {
  body { max-width: none; margin: 0; font-size: 10pt; }
  section { break-inside: auto; }
  .scroll { overflow: visible; }
  table { font-size: 7pt; }
  summary { color: inherit; }
}
"""


def render_html(document: dict[str, Any], store: ArtifactStore) -> str:
    created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(document["created_at"]))
    model = document.get("model", {})
    sections = "".join(
        _stage_section(name, stage, store) for name, stage in document["stages"].items()
    )
    model_line = " · ".join(
        f"{field_name(k).lower()} {_esc(human_value(model[k]))}"
        for k in ("format", "arch")
        if model.get(k)
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ModelGuard audit {_esc(document["audit_id"])}</title>
<style>{_STYLE}</style></head><body>
<h1>ModelGuard audit {_esc(document["audit_id"])}</h1>
<p class="muted">Audit {_esc(document["state"])} · submitted {created}
{" · " + model_line if model_line else ""}</p>
{_summary_section(document)}
{sections}
</body></html>
"""
