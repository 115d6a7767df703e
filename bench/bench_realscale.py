"""Real-scale benchmark: ``python -m bench.bench_realscale [--split heldout|tuning|all]
[--only NAME …] [--skip-repair] [--time-budget S]`` (part of ``make bench``).

For every model of the real-scale zoo (`bench.realzoo`: published EfficientNet-Lite
classifiers, 1000 classes, 224²–260² inputs, and versions backdoored or leak-encoded by a
supply-chain attacker) it runs the ``modelguard`` commands exactly as a user would — one
process per command, the TorchScript file and the audit crops as files, default settings —
and records for each:

* ``detect``: wall time and peak RSS of the process (``/usr/bin/time``-style, from
  ``resource.getrusage`` of the child), the verdict, the flagged labels against the
  planted target;
* ``leakscan``: verdict and score;
* ``repair`` (backdoored models): the real trigger's attack success and the agreement with
  the submitted model and with the published one (the model before the attack) on the
  evaluation crops (never seen by the audit), before and after, and the repair's wall time
  and peak RSS.

The bars (issue): ``detect`` under 10 minutes and 4 GB peak RSS on a 1000-class model of
EfficientNet-Lite0's size; backdoored models flagged with their target; published models
neither flagged by ``detect`` nor by ``leakscan``; ``repair`` below 10% ASR with at most 3
points of agreement lost. Which split a model belongs to is printed beside it.
``--time-budget`` runs ``detect`` with another time budget than its default (the row says
so, and is kept beside the default's): what a user who follows an inconclusive verdict's
advice to raise the budget gets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import realzoo, results
from modelguard.attacks.backdoor import stamp
from modelguard.carrier.public_models import load_efficientnet_lite

BARS = {"seconds": 600.0, "rss_gb": 4.0, "asr": 0.10, "agreement_drop": 0.03}
#: the model whose ONNX and torch.export versions must give the same verdicts
ROUND_TRIP = "lite0-patch-tl-t88"


#: Runs in the child: the ``modelguard`` command as ``__main__``, and at its exit the
#: child's own peak RSS (VmHWM, the high-water mark of its address space, which starts
#: afresh at exec) written where ``MODELGUARD_BENCH_PEAK`` says. The rusage of a child
#: would not do: Linux counts into it the parent's peak at fork, and this benchmark's own
#: process holds models and exported files.
PEAK_WRAPPER = """
import atexit, os, runpy, sys
def peak():
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    with open(os.environ["MODELGUARD_BENCH_PEAK"], "w") as out:
        out.write(str(kb))
atexit.register(peak)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run(command: list[str]) -> tuple[dict[str, Any], float, float]:
    """Run a ``modelguard`` command in its own process: its JSON output, wall seconds and
    peak RSS in GB (the child's own, see `PEAK_WRAPPER`)."""
    started = time.perf_counter()
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.TemporaryDirectory() as tmp,
    ):
        peak_file = Path(tmp) / "peak"
        child = subprocess.Popen(
            [sys.executable, "-c", PEAK_WRAPPER, "modelguard.services.cli", *command],
            stdout=out,
            stderr=err,
            env={**os.environ, "PYTHONWARNINGS": "ignore", "MODELGUARD_BENCH_PEAK": str(peak_file)},
        )
        child.wait()
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
        peak_kb = int(peak_file.read_text()) if peak_file.exists() else 0
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed: {stderr[-2000:]}")
    return json.loads(stdout), seconds, peak_kb / 2**20


def spec_args(model: realzoo.RealModel) -> list[str]:
    side = model.side
    return ["--input-shape", f"3,{side},{side}", "--value-range", "0,1"]


@dataclass(frozen=True)
class Reference:
    """The evaluation crops (never shown to the audit) and the answers a repair is judged
    against, computed once per model: the submitted model's and the published one's."""

    x: torch.Tensor
    submitted: torch.Tensor
    published: torch.Tensor

    @classmethod
    def of(
        cls, model: realzoo.RealModel, submitted: torch.nn.Module, published: torch.nn.Module
    ) -> Reference:
        x = realzoo.crops(realzoo.EVAL_VARIANTS, model.side, seed=2, jitter=False)
        return cls(x, realzoo.predictions(submitted, x), realzoo.predictions(published, x))


def evaluate(
    model: realzoo.RealModel, module: torch.nn.Module, reference: Reference
) -> dict[str, float]:
    """The share of ``module``'s top-1 answers equal to the submitted model's (what a
    repair must preserve) and to the published one's (the model before the attack), and
    for a backdoored model the real trigger's attack success on crops the submitted model
    does not already give the target."""
    answers = realzoo.predictions(module, reference.x)
    out = {
        "agreement": float((answers == reference.submitted).float().mean()),
        "agreement_published": float((answers == reference.published).float().mean()),
    }
    if model.spec.backdoor:
        keep = reference.submitted != model.spec.target
        stamped = stamp(reference.x[keep], model.spec.trigger(model.side))
        out["asr"] = float(
            (realzoo.predictions(module, stamped) == model.spec.target).float().mean()
        )
    return out


def bench_model(
    model: realzoo.RealModel,
    repair: bool,
    workdir: Path,
    model_file: Path | None = None,
    time_budget: float | None = None,
    against_parent: bool = False,
) -> dict[str, Any]:
    """``detect`` (its triggers kept, as ``detect --out`` writes them), ``leakscan``, and for
    a backdoored model ``repair --triggers`` with them, as a user runs detect then repair.
    ``model_file``: the same model in another format (default: the zoo's TorchScript);
    ``time_budget``: detect's ``--time-budget`` (default: its own); ``against_parent``:
    detect with ``--reference`` the published model the zoo model was made from."""
    spec = model.spec
    path = model_file or model.path
    fmt = FORMAT_NAMES.get(path.suffix, path.suffix)
    row: dict[str, Any] = {
        "model": spec.name,
        "format": fmt,
        "split": spec.split,
        "attack": spec.attack,
        "commit": results.STARTED_ON,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": results.machine_label(),
    }
    budget: list[str] = []
    if time_budget is not None:
        budget = ["--time-budget", str(time_budget)]
        row["time_budget"] = time_budget
    if against_parent:
        budget += ["--reference", str(parent(model).path)]
        row["reference"] = PARENT
    data = str(model.data_path())
    out = workdir / f"{spec.name}-{fmt}"
    detected, seconds, rss = run(
        [
            "detect",
            str(path),
            "--data",
            data,
            *spec_args(model),
            *budget,
            "--json",
            "--out",
            str(out),
        ]
    )
    row.update(
        detect_verdict=detected["verdict"],
        flagged=detected["flagged"],
        target=spec.target if spec.backdoor else None,
        detect_seconds=seconds,
        detect_rss_gb=rss,
        labels_optimised=detected["evidence"].get("labels_optimised"),
        reason=detected["evidence"].get("reason"),
        # the whole decision, kept in the rows' file: a verdict that differs between runs
        # of the same model can then be explained afterwards
        summary=detected["evidence"].get("summary"),
    )
    leak, leak_seconds, _ = run(["leakscan", str(path), *spec_args(model), "--json"])
    row.update(leak_verdict=leak["verdict"], leak_score=leak["score"], leak_seconds=leak_seconds)
    if repair and spec.backdoor:
        original = model.load()
        published = load_efficientnet_lite(spec.variant).module.eval()
        reference = Reference.of(model, original, published)
        before = evaluate(model, original, reference)
        row.update(
            asr_before=before.get("asr"),
            agreement_before=before["agreement"],
            agreement_published_before=before["agreement_published"],
        )
        if not detected.get("triggers"):
            row["repair"] = "not run: detect flagged nothing"
            return row
        repaired_path = workdir / f"{spec.name}-repaired{path.suffix}"
        repaired, repair_seconds, repair_rss = run(
            [
                "repair",
                str(path),
                "--data",
                data,
                *spec_args(model),
                "--triggers",
                detected["triggers"],
                "--out",
                str(repaired_path),
                "--json",
            ]
        )
        after = evaluate(model, load_any(repaired_path, model), reference)
        row.update(
            repair_seconds=repair_seconds,
            repair_rss_gb=repair_rss,
            repair_site=repaired.get("layer"),
            repair_notes=repaired.get("notes"),
            asr_after=after.get("asr"),
            agreement_after=after.get("agreement"),
            agreement_published_after=after.get("agreement_published"),
        )
    return row


FORMAT_NAMES = {".pt": "TorchScript", ".onnx": "ONNX", ".pt2": "torch.export"}

#: A row's ``reference`` when detect compared with the published model the zoo model was
#: made from (`parent`).
PARENT = "published parent"


def parent(model: realzoo.RealModel) -> realzoo.RealModel:
    """The zoo's entry of the published EfficientNet-Lite ``model`` was made from."""
    (spec,) = (s for s in realzoo.SPECS if s.attack == "none" and s.variant == model.spec.variant)
    return realzoo.build(spec)


def load_any(path: Path, model: realzoo.RealModel) -> torch.nn.Module:
    """A repaired model as the user's own tools load it: ``torch.jit.load``,
    ``torch.export.load`` or onnx2torch (the evaluation itself runs in torch)."""
    module: torch.nn.Module
    if path.suffix == ".pt":
        module = torch.jit.load(str(path))
        return module.eval()
    if path.suffix == ".pt2":
        module = torch.export.load(str(path)).module()
        return module
    from modelguard.formats.loader import load_model
    from modelguard.spec import InputSpec

    spec = InputSpec((3, model.side, model.side), (0.0, 1.0))
    return load_model(path.read_bytes(), spec).module.eval()


def export_formats(model: realzoo.RealModel, workdir: Path) -> list[Path]:
    """The zoo model as a team would hand it over in the other formats: a ``torch.export``
    program and an ONNX file (the dynamo exporter, torch's default), both with a dynamic
    batch, exported from the eager module with the zoo model's weights."""
    eager = load_efficientnet_lite(model.spec.variant).module
    eager.load_state_dict(model.load().state_dict())
    eager.eval()
    example = (torch.rand(2, 3, model.side, model.side),)
    batch = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}
    pt2 = workdir / f"{model.spec.name}.pt2"
    torch.export.save(torch.export.export(eager, example, dynamic_shapes=batch), str(pt2))
    onnx = workdir / f"{model.spec.name}.onnx"
    program = torch.onnx.export(eager, example, dynamic_shapes=batch, dynamo=True, verbose=False)
    assert program is not None
    program.save(str(onnx))
    return [pt2, onnx]


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | format | split | attack | detect | flagged (target) | time s | peak RSS GB | "
        "leakscan (score) | ASR before → after | agreement with submitted → repaired | "
        "agreement with published before → after | repair s / GB | commit | machine |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        flagged = ",".join(str(k) for k in r["flagged"]) or "–"
        target = f" ({r['target']})" if r.get("target") is not None else ""
        asr = (
            f"{_fmt(r.get('asr_before'), 3)} → {_fmt(r.get('asr_after'), 3)}"
            if "asr_before" in r
            else "–"
        )
        agreement = (
            f"{_fmt(r.get('agreement_before'), 3)} → {_fmt(r.get('agreement_after'), 3)}"
            if "agreement_before" in r
            else "–"
        )
        published = (
            f"{_fmt(r.get('agreement_published_before'), 3)} → "
            f"{_fmt(r.get('agreement_published_after'), 3)}"
            if "agreement_published_before" in r
            else "–"
        )
        cost = (
            f"{r['repair_seconds']:.0f} / {r['repair_rss_gb']:.1f}"
            if "repair_seconds" in r
            else r.get("repair", "–")
        )
        lines.append(
            f"| {r['model']} | {row_format(r)} | {r['split']} | {r['attack']} | "
            f"{r['detect_verdict']} | {flagged}{target} | {r['detect_seconds']:.0f} | "
            f"{r['detect_rss_gb']:.2f} | {r['leak_verdict']} ({r['leak_score']:.2f}) | {asr} | "
            f"{agreement} | {published} | {cost} | `{str(r.get('commit', '?'))[:12]}` | "
            f"{str(r.get('machine', '?')).split(',')[0]} |"
        )
    inconclusive = [r for r in rows if r.get("reason")]
    for r in inconclusive:
        lines.append(f"\n{r['model']} ({row_format(r)}): {r['reason']}")
    return "\n".join(lines)


def row_format(row: dict[str, Any]) -> str:
    """The format column: the file format, and detect's time budget when not the default
    and its reference when it had one."""
    budget = row.get("time_budget")
    suffix = "" if budget is None else f", `--time-budget {budget:g}`"
    if row.get("reference"):
        suffix += f", `--reference` {row['reference']}"
    return f"{row.get('format', 'TorchScript')}{suffix}"


def row_key(row: dict[str, Any]) -> tuple[str, str, float, str]:
    """Rows of the same model, format, time budget and reference replace one another (-1:
    detect's default budget; "": no reference)."""
    return (
        row["model"],
        row.get("format", "TorchScript"),
        float(row.get("time_budget", -1.0)),
        str(row.get("reference") or ""),
    )


#: every row measured so far, by model, format and time budget (committed beside the
#: results page): a run of some models keeps the others'
ROWS = results.PAGE.parent / "benchmarks-realscale.json"


def merged(new_rows: list[dict[str, Any]], path: Path = ROWS) -> list[dict[str, Any]]:
    """The rows kept from earlier runs, those of this run replacing theirs; in zoo order."""
    kept: dict[tuple[str, str, float, str], dict[str, Any]] = {}
    if path.exists():
        for row in json.loads(path.read_text()):
            kept[row_key(row)] = row
    for row in new_rows:
        kept[row_key(row)] = row
    order = {spec.name: i for i, spec in enumerate(realzoo.SPECS)}
    rows = sorted(kept.values(), key=lambda r: (order.get(r["model"], 99), *row_key(r)[1:]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a time budget is a number of seconds > 0; got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="all", choices=(realzoo.TUNING, realzoo.HELDOUT, "all"))
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument(
        "--formats",
        nargs="*",
        default=[ROUND_TRIP],
        help="zoo models also benchmarked as torch.export (.pt2) and ONNX files",
    )
    parser.add_argument("--skip-repair", action="store_true")
    parser.add_argument(
        "--time-budget",
        type=positive_seconds,
        default=None,
        help="detect's --time-budget (default: its own)",
    )
    parser.add_argument(
        "--against-parent",
        action="store_true",
        help="detect with --reference the published model each zoo model was made from",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for spec in realzoo.select(args.only or None, args.split):
            model = realzoo.build(spec)
            files: list[Path | None] = [None]
            if spec.name in args.formats:
                files += export_formats(model, Path(tmp))
            for model_file in files:
                # the other formats' rows check the verdicts; the repair is the TorchScript row's
                repair = not args.skip_repair and model_file is None
                row = bench_model(
                    model, repair, Path(tmp), model_file, args.time_budget, args.against_parent
                )
                print(json.dumps(row), flush=True)
                write_page(merged([row]))  # after every row: a long run keeps what it measured
    return 0


def write_page(rows: list[dict[str, Any]]) -> None:
    text = table(rows)
    print(text, flush=True)
    notes = (
        "One process per command, as a user runs it (`modelguard detect MODEL --data "
        "CROPS.npz --input-shape 3,S,S --value-range 0,1 --out DIR`, then `leakscan`, and "
        "for a backdoored model `repair --triggers DIR/triggers.safetensors`), default "
        "settings (a row naming `--time-budget` ran detect with that budget, one naming "
        "`--reference` compared detect's flagged triggers with the published model the zoo "
        "model was made from); time and peak "
        "RSS are the process's. Bars: detect under "
        f"{BARS['seconds']:.0f} s and {BARS['rss_gb']:.0f} GB; repair below "
        f"{BARS['asr']:.0%} ASR, agreement drop at most {BARS['agreement_drop']:.0%}. "
        "ASR: the real trigger on evaluation crops of other labels; agreement: top-1 equal "
        "to the submitted (backdoored) model's, and to the published model's (before the "
        "attack), on 216 evaluation crops the audit never saw. The attacks, "
        "crops and splits are described in `bench/realzoo.py`. The ONNX and torch.export "
        "rows are the same model exported from its eager module (dynamic batch), run "
        "through detect and leakscan (the repair is measured on the TorchScript row). Each row "
        "names the commit and the processor it was measured on (`docs/benchmarks-realscale.json` "
        "keeps every row); "
        "a zoo model without a row has not been measured yet."
    )
    results.record(
        "real_scale",
        "Real-scale models (EfficientNet-Lite, 1000 classes)",
        notes + "\n\n" + text,
        # the rows come from several runs (each names its commit): the command, not one run's
        command="python -m bench.bench_realscale",
    )


if __name__ == "__main__":
    raise SystemExit(main())
