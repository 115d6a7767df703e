"""The ``modelguard`` command.

Audits go through the pruning-orchestrator's gRPC API: of a running stack (``--target`` or
MODELGUARD_CLI_TARGET), or of an embedded stack this process starts (all six services,
in-memory bus, local store under .modelguard/). ``detect``, ``repair`` and ``leakscan``
run the same algorithm code in-process for a user with one model and no cluster.

Exit codes: 0 success (whatever the verdict), 1 failure, 2 bad input or refused file.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.console import Console
from rich.table import Table

from shared.config import SERVICES, PlatformSettings
from shared.errors import InvalidInput, ModelGuardError
from shared.spec import InputSpec

err_console = Console(stderr=True)
out_console = Console()

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class CliSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELGUARD_CLI_", extra="forbid")
    target: str = Field(
        "",
        description="host:port of a running pruning-orchestrator; "
        "empty: start an embedded stack in this process.",
    )
    timeout: float = Field(120.0, description="Seconds to wait for a gRPC answer.")
    trainer: str = Field("", description="host:port of carrier-trainer (empty: embedded).")
    mapper: str = Field("", description="host:port of result-mapper (empty: embedded).")
    token: SecretStr = Field(
        SecretStr(""),
        validation_alias=AliasChoices("MODELGUARD_TOKEN", "MODELGUARD_CLI_TOKEN"),
        description="Bearer token sent with every call (MODELGUARD_TOKEN; see `modelguard "
        "token create`).",
    )
    tls_ca_file: str = Field("", description="CA (PEM) verifying the servers; set: use TLS.")
    tls_cert_file: str = Field("", description="Client certificate (PEM) for mTLS.")
    tls_key_file: str = Field("", description="Key (PEM) of the client certificate.")


def client_credentials(args: argparse.Namespace) -> dict[str, Any]:
    """Token and TLS for the clients: command-line options over the environment."""
    from shared.channels import ClientTls

    settings = CliSettings()
    token = getattr(args, "token", None) or settings.token.get_secret_value()
    tls = ClientTls.of(
        getattr(args, "tls_ca", None) or settings.tls_ca_file,
        getattr(args, "tls_cert", None) or settings.tls_cert_file,
        getattr(args, "tls_key", None) or settings.tls_key_file,
    )
    return {"token": token, "tls": tls}


# --- helpers -----------------------------------------------------------------------------
def spec_from_args(args: argparse.Namespace) -> InputSpec:
    if not args.input_shape or not args.value_range:
        raise InvalidInput(
            "declare the model's input: --input-shape C,H,W and --value-range MIN,MAX "
            "(and --mean/--std if the model expects normalised inputs); it is never guessed"
        )
    return InputSpec.parse(args.input_shape, args.value_range, args.mean, args.std)


def add_spec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-shape", required=True, help="C,H,W, e.g. 1,28,28")
    parser.add_argument("--value-range", required=True, help="MIN,MAX of the data, e.g. 0,1")
    parser.add_argument("--mean", help="per-channel mean the model normalises with")
    parser.add_argument("--std", help="per-channel std the model normalises with")


def add_rule_arg(parser: argparse.ArgumentParser) -> None:
    from shared.detection.neural_cleanse import MODELGUARD, RULES

    parser.add_argument(
        "--rule",
        choices=RULES,
        default=MODELGUARD,
        help="backdoor detection rule: modelguard (default: log-scale MAD, size rule, "
        "screening, restarts) or paper (Neural Cleanse's original test: every label fully "
        "optimised, MAD on linear norms, nothing else)",
    )


def read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise InvalidInput(f"cannot read the {what} file {path}: {err.strerror}") from None


@contextmanager
def audit_client(args: argparse.Namespace, *, workers: bool) -> Iterator[Any]:
    """A client of the configured orchestrator, or of an embedded stack started here."""
    from services.audit_client import AuditClient

    settings = CliSettings()
    target = getattr(args, "target", None) or settings.target
    credentials = client_credentials(args)
    if target:
        with AuditClient(target, timeout=settings.timeout, **credentials) as client:
            yield client
        return
    from services.launcher import start_stack

    platform = PlatformSettings()
    logging.getLogger().setLevel(logging.WARNING)
    names = SERVICES if workers else ("pruning-orchestrator",)
    # read-only commands need only the orchestrator's API, and must not resume work that
    # they would abandon on exit
    with (
        start_stack(platform, names, workers=workers) as stack,
        AuditClient(stack.orchestrator_address, timeout=settings.timeout, **credentials) as client,
    ):
        yield client


def progress_printer(label: str) -> Callable[[float, str], None]:
    state = {"last": -1.0}

    def report(fraction: float, message: str = "") -> None:
        if fraction - state["last"] >= 0.05 or fraction >= 1.0:
            state["last"] = fraction
            err_console.print(f"[dim]{label} {fraction * 100:5.1f}% {message}[/dim]")

    return report


# --- audit -------------------------------------------------------------------------------
STATE_NAMES = {0: "unspecified", 1: "queued", 2: "running", 3: "succeeded", 4: "failed"}
STAGE_NAMES = {
    0: "?",
    1: "not run",
    2: "pending",
    3: "running",
    4: "done",
    5: "failed",
    6: "skipped",
}


def cmd_audit_submit(args: argparse.Namespace) -> int:
    from shared.proto.modelguard.v1 import jobs_pb2

    spec = spec_from_args(args)
    options = jobs_pb2.AuditOptions(
        reversal_steps=args.steps,
        layer=args.layer or "",
        repair_mode=args.repair_mode,
        seed=args.seed,
        skip_repair=args.repair_mode == "none",
        detection_rule=args.rule,
    )
    embedded = not (args.target or CliSettings().target)
    with audit_client(args, workers=True) as client:
        audit = client.submit(
            Path(args.model), Path(args.data), spec, arch=args.arch or "", options=options
        )
        err_console.print(f"submitted audit [bold]{audit.audit_id}[/bold]")
        if args.wait or embedded:
            if embedded and not args.wait:
                err_console.print(
                    "[dim]embedded mode: waiting, since the in-process "
                    "services stop when this command exits[/dim]"
                )
            audit = watch(client, audit.audit_id)
            print_audit(audit)
        else:
            out_console.print(audit.audit_id)
    return EXIT_OK if audit.state != 4 else EXIT_FAILED


def watch(client: Any, audit_id: str) -> Any:
    last: dict[str, str] = {}
    audit = None
    for audit in client.watch(audit_id):
        for stage in audit.stages:
            line = f"{STAGE_NAMES[stage.state]} {stage.progress * 100:3.0f}% {stage.message}"
            if last.get(stage.stage) != line:
                last[stage.stage] = line
                err_console.print(f"[dim]{stage.stage:>18}: {line}[/dim]")
    return audit


def print_audit(audit: Any) -> None:
    out_console.print(f"audit [bold]{audit.audit_id}[/bold]: {STATE_NAMES[audit.state]}")
    table = Table("stage", "state", "message")
    for stage in audit.stages:
        message = stage.error.message if stage.error.message else stage.message
        table.add_row(stage.stage, STAGE_NAMES[stage.state], message)
    out_console.print(table)
    for stage in audit.stages:
        if not stage.summary_json:
            continue
        summary = json.loads(stage.summary_json)
        if stage.stage == "trigger-reversal" and summary.get("labels"):
            labels = Table(
                "label",
                "L1 norm",
                "anomaly index",
                "attack success",
                "flagged",
                title="trigger reversal (Neural Cleanse, MAD)",
            )
            flagged = set(summary.get("flagged", []))
            for row in summary["labels"]:
                labels.add_row(
                    str(row["label"]),
                    _fixed(row["l1_norm"], 2),
                    _fixed(row["anomaly_index"], 2),
                    _fixed(row["attack_success"], 3),
                    "yes" if row["label"] in flagged else "",
                )
            out_console.print(labels)
            out_console.print(f"verdict: [bold]{summary.get('verdict')}[/bold]")
        if stage.stage == "leak-detector":
            out_console.print(
                f"leak verdict: [bold]{summary.get('verdict')}[/bold] "
                f"(score {summary.get('score', 0):.3g})"
            )
            layers = Table(
                "layer",
                "count",
                "min",
                "max",
                "mean",
                "variance",
                "skewness",
                "kurtosis",
                ">3σ",
                title="parameter statistics",
            )
            for row in summary.get("layers", []):
                layers.add_row(
                    row["layer"],
                    str(row["count"]),
                    *(
                        f"{row[k]:.4g}"
                        for k in (
                            "min",
                            "max",
                            "mean",
                            "variance",
                            "skewness",
                            "kurtosis",
                            "tail_fraction",
                        )
                    ),
                )
            out_console.print(layers)
            for item in summary.get("evidence", [])[:10]:
                out_console.print(
                    f"  evidence: {item['layer']} {item['feature']} = {item['value']:.4g}"
                )
        if stage.stage == "repair" and "before" in summary:
            repair = Table("measure", "before", "after", title=f"repair ({summary.get('mode')})")
            for key in summary["before"]:
                repair.add_row(key, _num(summary["before"][key]), _num(summary["after"].get(key)))
            out_console.print(repair)
            out_console.print(f"pruned {len(summary.get('pruned', []))} neurons")
    if audit.report_html.sha256:
        out_console.print(f"report: modelguard audit report {audit.audit_id} --out DIR")


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _fixed(value: float | None, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return ", ".join(_num(v) for v in value)
    return str(value)


def cmd_audit_show(args: argparse.Namespace) -> int:
    with audit_client(args, workers=False) as client:
        audit = client.get(args.audit_id)
        if args.json:
            from google.protobuf import json_format

            print(json_format.MessageToJson(audit))
        else:
            print_audit(audit)
    return EXIT_OK


def cmd_audit_list(args: argparse.Namespace) -> int:
    with audit_client(args, workers=False) as client:
        audits = client.list(args.limit)
    table = Table(
        "audit",
        "state",
        "created",
        *(s for s in ("leak-detector", "trigger-reversal", "neuron-scoring", "repair")),
    )
    for audit in audits:
        stages = {s.stage: STAGE_NAMES[s.state] for s in audit.stages}
        table.add_row(
            audit.audit_id,
            STATE_NAMES[audit.state],
            time.strftime("%Y-%m-%d %H:%M", time.localtime(audit.created_at)),
            *(
                stages.get(s, "")
                for s in ("leak-detector", "trigger-reversal", "neuron-scoring", "repair")
            ),
        )
    out_console.print(table)
    return EXIT_OK


def cmd_audit_report(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with audit_client(args, workers=False) as client:
        audit = client.get(args.audit_id)
        if not audit.report_json.sha256:
            raise InvalidInput(
                f"audit {args.audit_id} has no report yet (state {STATE_NAMES[audit.state]})"
            )
        written = []
        for ref, name in (
            (audit.report_json, "report.json"),
            (audit.report_html, "report.html"),
            (audit.repaired_model, "repaired-model"),
        ):
            if ref.sha256:
                if name == "repaired-model":
                    name += ".pt" if "torchscript" in ref.media_type else ".safetensors"
                (out / name).write_bytes(client.download(ref))
                written.append(str(out / name))
    for path in written:
        out_console.print(path)
    return EXIT_OK


# --- one-shot commands ---------------------------------------------------------------------
def load_local_model(path: str, arch: str | None, spec: InputSpec) -> Any:
    from shared.formats.loader import load_model

    return load_model(read_file(path, "model"), spec, arch=arch or "")


def load_local_data(path: str, spec: InputSpec, num_classes: int) -> Any:
    from shared.datasets import load_npz

    return load_npz(read_file(path, "dataset"), spec, num_classes=num_classes)


def reversal_config(args: argparse.Namespace) -> Any:
    """The ReversalConfig of ``--rule`` with ``--seed``, ``--steps`` and ``--norm-scale``
    applied (an option contradicting the rule is refused: exit code 2)."""
    from shared.detection.neural_cleanse import ReversalConfig

    overrides: dict[str, Any] = {"seed": args.seed}
    if getattr(args, "steps", 0):
        overrides["steps"] = args.steps
    if getattr(args, "norm_scale", None):
        overrides["norm_scale"] = args.norm_scale
    return ReversalConfig.for_rule(args.rule, **overrides)


def cmd_detect(args: argparse.Namespace) -> int:
    from shared.detection.neural_cleanse import reverse_triggers

    config = reversal_config(args)
    spec = spec_from_args(args)
    model = load_local_model(args.model, args.arch, spec)
    data = load_local_data(args.data, spec, model.num_classes)
    started = time.perf_counter()
    result = reverse_triggers(
        model.module,
        data,
        spec,
        config=config,
        progress=progress_printer("reversal"),
    )
    seconds = time.perf_counter() - started
    if args.out:
        save_trigger_images(result, spec, Path(args.out))
    document = {
        "labels": [
            {
                "label": r.label,
                # strict JSON: a label whose trigger never reached the threshold has an
                # infinite norm and no index, written as null
                "l1_norm": _finite_or_none(r.l1_norm),
                "anomaly_index": _finite_or_none(r.anomaly_index),
                "attack_success": _finite_or_none(r.attack_success),
            }
            for r in result.labels
        ],
        "flagged": list(result.flagged),
        "verdict": result.verdict,
        "rule": config.rule,
        "seconds": round(seconds, 3),
    }
    if args.json:
        print(json.dumps(document))
    else:
        table = Table("label", "L1 norm", "anomaly index", "attack success", "flagged")
        for r in result.labels:
            table.add_row(
                str(r.label),
                _fixed(r.l1_norm, 2),
                _fixed(r.anomaly_index, 2),
                _fixed(r.attack_success, 3),
                "yes" if r.label in result.flagged else "",
            )
        out_console.print(table)
        out_console.print(
            f"verdict: [bold]{result.verdict}[/bold] "
            f"(flagged: {list(result.flagged) or 'none'}) in {seconds:.1f} s"
        )
    return EXIT_OK


def save_trigger_images(result: Any, spec: InputSpec, out: Path) -> list[Path]:
    from shared.plots import tensor_png

    out.mkdir(parents=True, exist_ok=True)
    low, high = spec.value_range
    written = []
    labels = list(result.flagged) or [min(result.labels, key=lambda r: r.l1_norm).label]
    for label in labels:
        mask = result.masks[label].numpy()
        pattern = ((result.patterns[label] - low) / (high - low)).numpy()
        for name, array in (("mask", mask), ("trigger", pattern * mask[None])):
            path = out / f"label{label}-{name}.png"
            path.write_bytes(tensor_png(array, scale=8))
            written.append(path)
    for path in written:
        err_console.print(f"wrote {path}")
    return written


def cmd_repair(args: argparse.Namespace) -> int:
    from shared.detection.neural_cleanse import reverse_triggers
    from shared.detection.triggers import ReversedTrigger, load_triggers
    from shared.formats.loader import LoadedModel, save_model
    from shared.repair.registry import repair

    spec = spec_from_args(args)
    model = load_local_model(args.model, args.arch, spec)
    data = load_local_data(args.data, spec, model.num_classes)
    started = time.perf_counter()
    triggers: list[ReversedTrigger]
    if args.triggers:
        labels = [int(v) for v in args.target.split(",")] if args.target else None
        triggers = load_triggers(read_file(args.triggers, "triggers"), labels)
    else:
        result = reverse_triggers(
            model.module,
            data,
            spec,
            config=reversal_config(args),
            progress=progress_printer("reversal"),
        )
        flagged = [int(v) for v in args.target.split(",")] if args.target else list(result.flagged)
        if not flagged:
            err_console.print("no backdoor found: nothing to repair (use --target to force)")
            if args.json:
                print(
                    json.dumps(
                        {
                            "target_labels": [],
                            "pruned": [],
                            "before": {},
                            "after": {},
                            "curve": [],
                            "seconds": round(time.perf_counter() - started, 3),
                        }
                    )
                )
            return EXIT_OK
        triggers = [
            ReversedTrigger(label, result.masks[label], result.patterns[label]) for label in flagged
        ]
    repaired = repair(
        model.module,
        data,
        spec,
        triggers,
        mode=args.mode,
        layer=args.layer or None,
        progress=progress_printer("repair"),
    )
    if repaired.model is None:
        raise ModelGuardError("repair returned no model")
    out = LoadedModel(
        module=repaired.model, format=model.format, arch=model.arch, num_classes=model.num_classes
    )
    Path(args.out).write_bytes(save_model(out))
    document = repaired.to_dict()
    document["seconds"] = round(time.perf_counter() - started, 3)
    if args.json:
        print(json.dumps(document))
    else:
        table = Table("measure", "before", "after")
        for key in document["before"]:
            table.add_row(key, _num(document["before"][key]), _num(document["after"].get(key)))
        out_console.print(table)
        out_console.print(f"pruned {len(document['pruned'])} neurons; wrote {args.out}")
    return EXIT_OK


def cmd_leakscan(args: argparse.Namespace) -> int:
    from shared.formats.loader import load_model
    from shared.formats.scan import scan_model_bytes
    from shared.leak.detector import detect_leak

    started = time.perf_counter()
    data = read_file(args.model, "model")
    scan = scan_model_bytes(data)  # refuses pickles before anything else happens
    if args.input_shape:
        spec = InputSpec.parse(args.input_shape, args.value_range or "0,1", args.mean, args.std)
        module = load_model(data, spec, arch=args.arch or "").module
    else:
        module = load_weights_only(data, scan.kind, args.arch)
    verdict = detect_leak(module)
    document: dict[str, Any] = {
        "verdict": verdict.verdict,
        "score": verdict.score,
        "evidence": [
            {"layer": e.layer, "feature": e.feature, "value": e.value} for e in verdict.evidence
        ],
        "seconds": round(time.perf_counter() - started, 4),
    }
    if args.json:
        print(json.dumps(document))
    else:
        out_console.print(f"verdict: [bold]{verdict.verdict}[/bold] (score {verdict.score:.3g})")
        for item in document["evidence"]:
            out_console.print(f"  {item['layer']}: {item['feature']} = {item['value']:.4g}")
    return EXIT_OK


def load_weights_only(data: bytes, kind: str, arch: str | None) -> Any:
    """Leak forensics needs parameters, not a forward pass: a TorchScript module or a
    state dict wrapped so its tensors can be walked, whatever the architecture."""
    import io

    import torch
    from safetensors.torch import load as safetensors_load

    if kind == "torchscript":
        return torch.jit.load(io.BytesIO(data), map_location="cpu")
    if kind == "safetensors":
        state = safetensors_load(data)
    else:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    from shared.leak.detector import module_from_state_dict

    return module_from_state_dict(state)


# --- carrier serving -----------------------------------------------------------------------
@contextmanager
def carrier_client(args: argparse.Namespace) -> Iterator[Any]:
    from services.carrier_client import CarrierClient

    settings = CliSettings()
    trainer = args.trainer or settings.trainer
    mapper = args.mapper or settings.mapper
    credentials = client_credentials(args)
    if trainer and mapper:
        with CarrierClient(trainer, mapper, timeout=settings.timeout, **credentials) as client:
            yield client
        return
    from services.launcher import start_stack

    logging.getLogger().setLevel(logging.WARNING)
    with (
        start_stack(PlatformSettings(), ("carrier-trainer", "result-mapper")) as stack,
        CarrierClient(
            stack["carrier-trainer"].address,
            stack["result-mapper"].address,
            timeout=settings.timeout,
            **credentials,
        ) as client,
    ):
        yield client


def _wait_printer(info: Any) -> None:
    err_console.print(f"[dim]carrier generation {info.generation}: {STATE_NAMES[info.state]}[/dim]")


def cmd_carrier_request(args: argparse.Namespace) -> int:
    from shared.proto.modelguard.v1 import jobs_pb2

    options = jobs_pb2.CarrierOptions(
        steps=args.steps,
        hidden=args.hidden,
        seed=args.seed,
        public_model=args.public_model or "",
        task=args.task or "",
    )
    rotating = args.carrier_command == "rotate"
    with carrier_client(args) as client:
        generation, credential = client.request(
            args.user, (args.credential or "") if rotating else "", options
        )
        err_console.print(
            f"{'rotated' if rotating else 'enrolled'} {args.user}: carrier "
            f"generation {generation} is training"
        )
        out_console.print(f"credential: {credential}")
        err_console.print(
            "[dim]keep the credential: it is shown once, and only its hash is stored[/dim]"
        )
        embedded = not (
            (args.trainer or CliSettings().trainer) and (args.mapper or CliSettings().mapper)
        )
        if args.wait or embedded:
            info = client.wait_ready(args.user, credential, on_wait=_wait_printer)
            manifest = json.loads(client.download(args.user, credential, "manifest"))
            out_console.print(
                f"carrier ready: generation {info.generation}, validation "
                f"accuracy {manifest.get('validation_accuracy', 0):.2%}"
            )
    return EXIT_OK


def load_images(paths: list[str], shape: tuple[int, int, int]) -> Any:
    """PNG/JPEG files, or one .npz with ``x``, as (N, C, H, W) floats in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    if len(paths) == 1 and paths[0].endswith(".npz"):
        with np.load(paths[0], allow_pickle=False) as archive:
            x = torch.from_numpy(np.asarray(archive["x"], dtype=np.float32))
        return x if x.ndim == 4 else x.unsqueeze(1)
    channels, height, width = shape
    images = []
    for path in paths:
        try:
            picture = Image.open(path).convert("L" if channels == 1 else "RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise InvalidInput(f"cannot read image {path}: {err}") from None
        array = np.asarray(picture.resize((width, height)), dtype=np.float32) / 255.0
        images.append(torch.from_numpy(array).reshape(height, width, -1).permute(2, 0, 1))
    return torch.stack(images)


def cmd_carrier_classify(args: argparse.Namespace) -> int:
    with carrier_client(args) as client:
        device = client.device(args.user, args.credential)
        x = load_images(args.images, (1, 28, 28))
        reply = client.classify_when_loaded(device, x)
    if args.json:
        print(
            json.dumps(
                {
                    "labels": reply.labels.tolist(),
                    "generation": reply.generation,
                    "probabilities": reply.probabilities.round(4).tolist(),
                }
            )
        )
    else:
        for path, label, probs in zip(
            args.images if len(args.images) == len(reply.labels) else range(len(reply.labels)),
            reply.labels,
            reply.probabilities,
            strict=False,
        ):
            out_console.print(f"{path}: {int(label)} (p={float(probs.max()):.3f})")
    return EXIT_OK


def cmd_carrier_revoke(args: argparse.Namespace) -> int:
    with carrier_client(args) as client:
        info = client.revoke(args.user, args.credential or "", args.reason or "")
    out_console.print(f"{args.user}: generation {info.generation} revoked")
    return EXIT_OK


def cmd_token_create(args: argparse.Namespace) -> int:
    from shared.auth import mint_token

    token, line = mint_token(args.tenant, "admin" if args.admin else "tenant")
    if args.append:
        with open(args.append, "a", encoding="utf-8") as tokens_file:
            tokens_file.write(line + "\n")
        err_console.print(f"[dim]appended the hashed line to {args.append}[/dim]")
    else:
        out_console.print(line, soft_wrap=True)
        err_console.print("[dim]add the line above to MODELGUARD_AUTH_TOKENS_FILE[/dim]")
    print(token)
    err_console.print(
        f"[dim]the token above is {args.tenant}'s: shown once, only its hash is stored; "
        "clients send it as MODELGUARD_TOKEN or --token[/dim]"
    )
    return EXIT_OK


def cmd_carrier_status(args: argparse.Namespace) -> int:
    with carrier_client(args) as client:
        info = client.info(args.user, args.credential)
    out_console.print(
        f"{args.user}: generation {info.generation}, {STATE_NAMES[info.state]}"
        + (f" ({info.error.message})" if info.error.message else "")
    )
    return EXIT_OK


# --- serve -------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from services.launcher import configure_logging, run_service, start_stack
    from shared.grpc_server import wait_for_termination

    if args.service != "all":
        run_service(args.service)
        return EXIT_OK
    platform = PlatformSettings()
    configure_logging(platform.log_level)
    stack = start_stack(platform, ephemeral_ports=False)
    for name, app in stack.apps.items():
        err_console.print(f"{name:>22}: gRPC {app.address}, metrics :{app.grpc.metrics_port}")
    wait_for_termination(stack.stop)
    return EXIT_OK


# --- parser --------------------------------------------------------------------------------
LAYER_HELP = (
    "layer to score and prune: a Linear or Conv2d module name (its output features or "
    "channels), or NAME:in for a Linear layer's input features (default: the first "
    "Linear layer that is not the classifier; fc:in when the classifier is the only one, "
    "as in a ResNet)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelguard", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--token", help="bearer token (default: MODELGUARD_TOKEN)")
    parser.add_argument("--tls-ca", help="CA (PEM) verifying the servers: use TLS")
    parser.add_argument("--tls-cert", help="client certificate (PEM) for mTLS")
    parser.add_argument("--tls-key", help="key (PEM) of the client certificate")
    commands = parser.add_subparsers(dest="command", required=True)

    audit = commands.add_parser("audit", help="submit and inspect audits").add_subparsers(
        dest="audit_command", required=True
    )
    submit = audit.add_parser("submit", help="submit a model and clean data for an audit")
    submit.add_argument("model", help="TorchScript file, or weights (safetensors) with --arch")
    submit.add_argument("--arch", help="registered architecture of a weights file")
    submit.add_argument("--data", required=True, help=".npz with x (N,C,H,W) and y (N,)")
    add_spec_args(submit)
    submit.add_argument(
        "--repair-mode", default="rollback", choices=["rollback", "shapley", "fine-pruning", "none"]
    )
    submit.add_argument("--layer", help=LAYER_HELP)
    submit.add_argument("--steps", type=int, default=0, help="reversal steps (0: default)")
    add_rule_arg(submit)
    submit.add_argument("--seed", type=int, default=0)
    submit.add_argument("--wait", action="store_true", help="wait for the audit to finish")
    submit.add_argument("--target", help="host:port of the pruning-orchestrator")
    submit.set_defaults(func=cmd_audit_submit)
    for name, func, helptext in (
        ("show", cmd_audit_show, "show an audit"),
        ("report", cmd_audit_report, "download an audit's report"),
    ):
        sub = audit.add_parser(name, help=helptext)
        sub.add_argument("audit_id")
        sub.add_argument("--target")
        if name == "show":
            sub.add_argument("--json", action="store_true")
        else:
            sub.add_argument("--out", required=True, help="directory for the report files")
        sub.set_defaults(func=func)
    listing = audit.add_parser("list", help="list recent audits")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--target")
    listing.set_defaults(func=cmd_audit_list)

    detect = commands.add_parser("detect", help="detect a backdoor in one model, in-process")
    detect.add_argument("model")
    detect.add_argument("--arch")
    detect.add_argument("--data", required=True)
    add_spec_args(detect)
    detect.add_argument("--steps", type=int, default=0)
    detect.add_argument("--seed", type=int, default=0)
    add_rule_arg(detect)
    detect.add_argument(
        "--norm-scale",
        choices=("log", "linear"),
        help="scale of the MAD test only (default: the rule's; modelguard: log); the size "
        "rule, screening and restarts stay: Neural Cleanse's original test is --rule paper",
    )
    detect.add_argument("--out", help="directory for the reversed trigger images")
    detect.add_argument("--json", action="store_true", help="one JSON object on stdout")
    detect.set_defaults(func=cmd_detect)

    repair_cmd = commands.add_parser("repair", help="repair a backdoored model, in-process")
    repair_cmd.add_argument("model")
    repair_cmd.add_argument("--arch")
    repair_cmd.add_argument("--data", required=True)
    add_spec_args(repair_cmd)
    repair_cmd.add_argument(
        "--mode", default="rollback", choices=["rollback", "shapley", "fine-pruning"]
    )
    repair_cmd.add_argument("--layer", help=LAYER_HELP)
    add_rule_arg(repair_cmd)
    repair_cmd.add_argument("--triggers", help="reversed triggers (safetensors) to use")
    repair_cmd.add_argument("--target", help="target label(s) to repair, comma-separated")
    repair_cmd.add_argument("--seed", type=int, default=0)
    repair_cmd.add_argument("--out", required=True, help="where to write the repaired model")
    repair_cmd.add_argument("--json", action="store_true")
    repair_cmd.set_defaults(func=cmd_repair)

    leak = commands.add_parser("leakscan", help="check a model for smuggled training data")
    leak.add_argument("model")
    leak.add_argument("--arch")
    leak.add_argument("--input-shape", help="optional: also check the model runs")
    leak.add_argument("--value-range")
    leak.add_argument("--mean")
    leak.add_argument("--std")
    leak.add_argument("--json", action="store_true")
    leak.set_defaults(func=cmd_leakscan)

    carrier = commands.add_parser(
        "carrier", help="carrier-based serving: enrol, classify, rotate"
    ).add_subparsers(dest="carrier_command", required=True)
    for name, helptext in (
        ("enroll", "enrol a user: train its carrier and mapper"),
        ("rotate", "rotate a user's carrier (revokes the old one now)"),
    ):
        sub = carrier.add_parser(name, help=helptext)
        sub.add_argument("--user", required=True)
        if name == "rotate":
            sub.add_argument("--credential", help="the user's (omit with an admin token)")
        sub.add_argument("--steps", type=int, default=0, help="training steps (0: default)")
        sub.add_argument("--hidden", type=int, default=0, help="mapper hidden width")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument(
            "--public-model",
            help="lenet5-fashion-features (default), lenet5-fashion or efficientnet-lite0",
        )
        sub.add_argument("--task", help="dataset the mapper classifies (default mnist)")
        sub.add_argument("--wait", action="store_true")
        sub.set_defaults(func=cmd_carrier_request)
    classify = carrier.add_parser("classify", help="classify images through your carrier")
    classify.add_argument("images", nargs="+", help="image files, or one .npz with x")
    classify.add_argument("--user", required=True)
    classify.add_argument("--credential", required=True)
    classify.add_argument("--json", action="store_true")
    classify.set_defaults(func=cmd_carrier_classify)
    status = carrier.add_parser("status", help="show a user's carrier")
    status.add_argument("--user", required=True)
    status.add_argument("--credential", required=True)
    status.set_defaults(func=cmd_carrier_status)
    revoke = carrier.add_parser(
        "revoke", help="revoke a user's carrier now (its credential, or an admin token)"
    )
    revoke.add_argument("--user", required=True)
    revoke.add_argument("--credential", help="the user's (omit with an admin token)")
    revoke.add_argument("--reason", help="recorded with the revocation")
    revoke.set_defaults(func=cmd_carrier_revoke)
    for sub in (classify, status, revoke, *(carrier.choices[n] for n in ("enroll", "rotate"))):
        sub.add_argument("--trainer", help="host:port of carrier-trainer")
        sub.add_argument("--mapper", help="host:port of result-mapper")

    token = commands.add_parser("token", help="API tokens").add_subparsers(
        dest="token_command", required=True
    )
    create = token.add_parser(
        "create", help="mint a bearer token: prints the tokens-file line and the token"
    )
    create.add_argument("--tenant", required=True, help="tenant id the token acts for")
    create.add_argument("--admin", action="store_true", help="an admin token (all tenants)")
    create.add_argument("--append", metavar="FILE", help="append the line to this tokens file")
    create.set_defaults(func=cmd_token_create)

    serve = commands.add_parser("serve", help="run one service, or all six (embedded)")
    serve.add_argument("service", choices=[*SERVICES, "all"])
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except InvalidInput as err:
        err_console.print(f"[red]error:[/red] {err}")
        return EXIT_BAD_INPUT
    except ModelGuardError as err:
        err_console.print(f"[red]error:[/red] {err}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
