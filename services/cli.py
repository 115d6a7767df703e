"""The ``modelguard`` command.

Audits go through the pruning-orchestrator's gRPC API: of a running stack (``--target`` or
MODELGUARD_CLI_TARGET), or of an embedded stack this process starts (all six services,
in-memory bus, local store under .modelguard/). ``detect``, ``repair`` and ``leakscan``
run the same use cases in-process for a user with one model and no cluster: the same
loader (`modelguard.jobdata`), the same summary documents, the same trigger pictures
(`modelguard.detection.render`) and the same rendering (`modelguard.services.present`) as an audit.
``scan`` runs the file-safety scanner alone, for a CI gate. Exit codes: `ExitCode`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.markup import escape

from modelguard.config import SERVICES, PlatformSettings
from modelguard.errors import IntegrityError, InvalidInput, ModelGuardError
from modelguard.services.present import (
    ProgressBoard,
    err_console,
    failed,
    job_state_name,
    out_console,
    print_audit,
    print_audit_list,
    print_leak,
    print_repair,
    print_reversal,
    print_robustness,
    print_scan,
    watch,
)
from modelguard.spec import InputSpec

if TYPE_CHECKING:
    from modelguard.clean_data import CleanData
    from modelguard.datasets import Dataset
    from modelguard.detection.base import DetectionResult
    from modelguard.detection.neural_cleanse import ReversalConfig
    from modelguard.formats.loader import LoadedModel
    from modelguard.jobdata import Limits, ModelAndData
    from modelguard.proto.modelguard.v1.carrier_trainer_pb2 import CarrierInfo
    from modelguard.proto.modelguard.v1.pruning_orchestrator_pb2 import Audit
    from modelguard.services.audit_client import AuditClient
    from modelguard.services.carrier_client import CarrierClient
    from modelguard.services.trigger_reversal.service import ReversalPlan


class ExitCode(IntEnum):
    """What ``modelguard`` exits with; a CI job gates on it."""

    OK = 0  #: done; no finding, and no verdict matched --fail-on
    FINDINGS = 1  #: `scan` found an unsafe file, or a verdict matched --fail-on
    BAD_INPUT = 2  #: usage error, bad input, or a file refused before loading
    FAILED = 3  #: the work failed: an audit failed, a server refused or was unreachable
    INTERRUPTED = 130  #: Ctrl-C


EXIT_CODES_HELP = (
    "exit codes: 0 ok (no finding; no verdict matched --fail-on), 1 findings (scan found an "
    "unsafe file, or a verdict matched --fail-on), 2 usage error, bad input or refused file, "
    "3 failure (audit failed, server error or unreachable), 130 interrupted"
)

#: --fail-on's verdicts: the detectors' (infected, inconclusive) and the leak detector's
#: (leak); "any" is all three.
FAIL_ON_VERDICTS = ("infected", "leak", "inconclusive")
FAIL_ON_ANY = "any"
#: `ReversalConfig.weight_layout`'s values (spelled out: the detection package imports
#: torch, which ``--help`` should not wait for; a test keeps them equal)
WEIGHT_LAYOUTS = ("auto", "as_loaded", "channels_last")


def parse_fail_on(value: str) -> frozenset[str]:
    """``--fail-on`` as the set of verdicts that fail: comma-separated names, ``any``."""
    names = {name.strip() for name in value.split(",") if name.strip()}
    unknown = names - {*FAIL_ON_VERDICTS, FAIL_ON_ANY}
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"takes {', '.join((*FAIL_ON_VERDICTS, FAIL_ON_ANY))}, comma-separated; got {value!r}"
        )
    return frozenset(FAIL_ON_VERDICTS) if FAIL_ON_ANY in names else frozenset(names)


def verdict_exit(verdicts: Iterable[str], fail_on: frozenset[str] | None) -> ExitCode:
    """`ExitCode.FINDINGS` when a verdict is one ``--fail-on`` names, else OK."""
    if fail_on and any(verdict in fail_on for verdict in verdicts):
        return ExitCode.FINDINGS
    return ExitCode.OK


def print_json(document: Any) -> None:
    """One JSON document on stdout: with ``--json`` nothing else goes there."""
    print(json.dumps(document))


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelguard")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


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
    public_key_file: str = Field(
        "",
        description="The deployment's Ed25519 public key (PEM) `modelguard verify` checks "
        "signatures with when --public-key is not given (`modelguard public-key --out`).",
    )


def client_credentials(args: argparse.Namespace) -> dict[str, Any]:
    """Token and TLS for the clients: command-line options over the environment."""
    from modelguard.channels import ClientTls

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


DATA_HELP = (
    "clean data: an .npz with x (N,C,H,W floats in the value range) and y (N,), or a folder "
    "of images (PNG, JPEG, BMP, WebP), directly in it or in one sub-folder per class; "
    "images are resized on their shorter side, centre-cropped to the input shape and "
    "scaled into the value range"
)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """``--data`` and how a folder of images is read: ``--labels``, ``--max-images``."""
    from modelguard.clean_data import DEFAULT_MAX_IMAGES, FOLDERS, PREDICTED

    parser.add_argument("--data", required=True, help=DATA_HELP)
    parser.add_argument(
        "--labels",
        metavar=f"{FOLDERS}|FILE.csv|{PREDICTED}",
        help=f"where a folder's labels come from: {FOLDERS} (the class sub-folders: their "
        "names when all are integers, else their sorted index; the default when there are "
        "any), FILE.csv (rows of file name relative to the folder, integer label; header "
        f"optional) or {PREDICTED} (the model's own top-1: no ground truth; also for an "
        ".npz without y)",
    )
    parser.add_argument(
        "--max-images",
        type=int,
        default=DEFAULT_MAX_IMAGES,
        help=f"a folder with more images is read as a random subset of this many, drawn "
        f"with --seed (default {DEFAULT_MAX_IMAGES:,}; the detectors use 1,000 at most)",
    )


def add_task_data_args(parser: argparse.ArgumentParser) -> None:
    """A team's own carrier task: ``--task-data`` and how a folder of images is read."""
    from modelguard.carrier.task_data import MIN_SAMPLES_PER_CLASS
    from modelguard.clean_data import DEFAULT_MAX_IMAGES, FOLDERS

    parser.add_argument(
        "--task-data",
        metavar="FILE_OR_DIR",
        help="your own task instead of --task: an .npz with x (N,C,H,W floats in [0, 1]) and "
        "y (N,) labels 0..K-1, or a folder of images in one sub-folder per class (PNG, JPEG, "
        f"BMP, WebP); at least 2 classes and {MIN_SAMPLES_PER_CLASS} samples of each; the "
        "mapper classifies K classes",
    )
    parser.add_argument(
        "--labels",
        metavar=f"{FOLDERS}|FILE.csv",
        help=f"where a task folder's labels come from: {FOLDERS} (the class sub-folders; the "
        "default) or FILE.csv (rows of file name relative to the folder, integer label)",
    )
    parser.add_argument(
        "--input-shape", help="C,H,W each image of a task folder is fitted to, e.g. 1,28,28"
    )
    parser.add_argument(
        "--max-images",
        type=int,
        default=DEFAULT_MAX_IMAGES,
        help=f"a task folder with more images is read as a random subset of this many, "
        f"drawn with --seed (default {DEFAULT_MAX_IMAGES:,})",
    )


def print_notes(clean: CleanData) -> None:
    """Where the labels came from (and any subset), on stderr: said, never left implicit."""
    for line in clean.notes:
        err_console.print(line, markup=False, highlight=False, soft_wrap=True)


def add_rule_arg(parser: argparse.ArgumentParser) -> None:
    """``--detector`` and ``--rule``, their choices from the detector registry."""
    from modelguard.detection.registry import DEFAULT_DETECTOR, DETECTORS, get_detector

    parser.add_argument(
        "--detector",
        choices=list(DETECTORS),
        default=DEFAULT_DETECTOR,
        help=f"backdoor detector (default {DEFAULT_DETECTOR}: Neural Cleanse, all labels "
        "batched; neural-cleanse-sequential: the original, one label after another)",
    )
    rules = list(dict.fromkeys(r for name in DETECTORS for r in get_detector(name).rules))
    parser.add_argument(
        "--rule",
        choices=rules,
        default=get_detector(DEFAULT_DETECTOR).rules[0],
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
def audit_client(args: argparse.Namespace, *, workers: bool) -> Iterator[AuditClient]:
    """A client of the configured orchestrator, or of an embedded stack started here."""
    from modelguard.services.audit_client import AuditClient

    settings = CliSettings()
    target = getattr(args, "target", None) or settings.target
    credentials = client_credentials(args)
    if target:
        with AuditClient(target, timeout=settings.timeout, **credentials) as client:
            yield client
        return
    from modelguard.services.launcher import start_stack

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


# --- audit -------------------------------------------------------------------------------
def cmd_audit_submit(args: argparse.Namespace) -> int:
    from modelguard.proto.modelguard.v1 import jobs_pb2
    from modelguard.repair.registry import NO_REPAIR

    spec = spec_from_args(args)
    options = jobs_pb2.AuditOptions(
        reversal_steps=args.steps,
        layer=args.layer or "",
        repair_mode=args.repair_mode,
        seed=args.seed,
        skip_repair=args.repair_mode == NO_REPAIR,
        detection_rule=args.rule,
        detector=args.detector,
        robustness_eps=args.eps or (),
        robustness_norm=args.norm,
        robustness_steps=args.attack_steps,
    )
    embedded = not (args.target or CliSettings().target)
    waits = args.wait or embedded
    if args.fail_on and not waits:
        raise InvalidInput("--fail-on needs the verdicts: add --wait")
    data = audit_data(args, spec)
    with audit_client(args, workers=True) as client:
        audit = client.submit(
            Path(args.model),
            data,
            spec,
            arch=args.arch or "",
            options=options,
            reference=Path(args.reference) if args.reference else None,
        )
        err_console.print(f"submitted audit [bold]{audit.audit_id}[/bold]")
        if waits:
            if embedded and not args.wait:
                err_console.print(
                    "[dim]embedded mode: waiting, since the in-process "
                    "services stop when this command exits[/dim]"
                )
            audit = watch(client, audit.audit_id)
            if not args.json:
                print_audit(audit)
        if args.json:
            print_json(audit_document(audit))
        elif not waits:
            out_console.print(audit.audit_id)
    if failed(audit.state):
        return ExitCode.FAILED
    return verdict_exit(audit_verdicts(audit), args.fail_on)


def audit_document(audit: Audit) -> dict[str, Any]:
    """An audit as JSON: the API's message (proto field names), each stage's summary
    parsed rather than left as a string."""
    from google.protobuf import json_format

    document = json_format.MessageToDict(audit, preserving_proto_field_name=True)
    for stage in document.get("stages", []):
        if stage.get("summary_json"):
            stage["summary"] = json.loads(stage.pop("summary_json"))
    return document


def audit_verdicts(audit: Audit) -> list[str]:
    """The verdicts of an audit's detection stages (trigger reversal, leak detector)."""
    from modelguard.topics import STAGE_LEAK_DETECTOR, STAGE_TRIGGER_REVERSAL

    verdicts = []
    for stage in audit.stages:
        if stage.stage in (STAGE_TRIGGER_REVERSAL, STAGE_LEAK_DETECTOR) and stage.summary_json:
            verdict = json.loads(stage.summary_json).get("verdict")
            if isinstance(verdict, str):
                verdicts.append(verdict)
    return verdicts


def audit_data(args: argparse.Namespace, spec: InputSpec) -> Path | bytes:
    """``--data`` as the service takes it: an .npz file as it is (the service checks it);
    a folder of images, or ``--labels``, read here and sent as the .npz it makes. The
    service's wire format stays one .npz."""
    path = Path(args.data)
    if args.labels is None and not path.is_dir():
        return path
    from modelguard.clean_data import PREDICTED, read_clean_data
    from modelguard.datasets import dataset_to_npz
    from modelguard.jobdata import load_model_from_bytes

    limits = cli_limits()
    model, num_classes = None, None
    if args.labels == PREDICTED:
        loaded = load_model_from_bytes(
            read_file(args.model, "model"), spec, args.arch or "", limits
        )
        model, num_classes = loaded.module, loaded.num_classes
    clean = read_clean_data(
        path,
        spec,
        labels=args.labels,
        model=model,
        num_classes=num_classes,
        max_images=args.max_images,
        max_bytes=limits.max_dataset_bytes,
        seed=args.seed,
    )
    print_notes(clean)
    return dataset_to_npz(clean.dataset)


def cmd_audit_show(args: argparse.Namespace) -> int:
    with audit_client(args, workers=False) as client:
        audit = client.get(args.audit_id)
    if args.json:
        print_json(audit_document(audit))
    else:
        print_audit(audit)
    return ExitCode.OK


def cmd_audit_list(args: argparse.Namespace) -> int:
    with audit_client(args, workers=False) as client:
        audits = client.list(args.limit)
    if args.json:
        print_json([audit_document(audit) for audit in audits])
    else:
        print_audit_list(audits)
    return ExitCode.OK


def cmd_audit_report(args: argparse.Namespace) -> int:
    from modelguard.services.audit_client import write_signed

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with audit_client(args, workers=False) as client:
        audit = client.get(args.audit_id)
        if not audit.report_json.sha256:
            raise InvalidInput(
                f"audit {args.audit_id} has no report yet (state {job_state_name(audit.state)})"
            )
        written: list[str] = []
        for ref, name in (
            (audit.report_json, "report.json"),
            (audit.report_html, "report.html"),
            (audit.repaired_model, "repaired-model"),
        ):
            if ref.sha256:
                data = client.download(ref)
                if name == "repaired-model":
                    name += model_extension(ref.media_type, data)
                written += [str(path) for path in write_signed(audit, ref, out / name, data)]
    if not audit.signatures:
        err_console.print("[yellow]this audit's artifacts carry no signature[/yellow]")
    if args.json:
        print_json({"audit_id": audit.audit_id, "files": written})
    else:
        for path in written:
            out_console.print(path)
    return ExitCode.OK


def model_extension(media_type: str, data: bytes) -> str:
    """The file suffix of a model artifact: its format's (by media type, else by content)."""
    from modelguard.formats.registry import by_media_type, sniff

    fmt = by_media_type(media_type)
    if fmt is None:
        try:
            fmt = sniff(data)
        except ModelGuardError:
            return ".bin"
    return fmt.extension


# --- one-shot commands ---------------------------------------------------------------------
def cli_limits() -> Limits:
    """The platform's file-size limits (MODELGUARD_MAX_MODEL_BYTES, ..._DATASET_BYTES):
    a file the CLI accepts is one an audit accepts."""
    from modelguard.jobdata import Limits

    return Limits.of(PlatformSettings())


def load_local_inputs(args: argparse.Namespace, spec: InputSpec) -> tuple[ModelAndData, CleanData]:
    """``MODEL`` (with ``--arch``) through the services' loader, then ``--data`` (an .npz
    as the services read it, or a folder of images) with ``--labels``; the notes on where
    the labels came from are printed."""
    from modelguard.clean_data import read_clean_data
    from modelguard.jobdata import ModelAndData, load_model_from_bytes

    limits = cli_limits()
    loaded = load_model_from_bytes(read_file(args.model, "model"), spec, args.arch or "", limits)
    clean = read_clean_data(
        Path(args.data),
        spec,
        labels=args.labels,
        model=loaded.module,
        num_classes=loaded.num_classes,
        max_images=args.max_images,
        max_bytes=limits.max_dataset_bytes,
        seed=args.seed,
    )
    print_notes(clean)
    return ModelAndData(model=loaded, data=clean.dataset, spec=spec), clean


def data_notes(clean: CleanData) -> dict[str, str]:
    """The notes of `print_notes` for a ``--json`` document."""
    notes = {"labels_from": clean.labels_from}
    if clean.subset:
        notes["data_subset"] = clean.subset
    return notes


def reversal_plan_of(args: argparse.Namespace, data: Dataset | None = None) -> ReversalPlan:
    """The trigger-reversal service's plan for ``--rule``, ``--seed``, ``--steps``,
    ``--norm-scale`` and ``--weight-layout``: the detector, the clean images it sees (the
    service's subset of ``data``) and its config. Without ``data``: to check the options
    before any file is read (an option contradicting the rule is refused: exit code 2)."""
    import torch

    from modelguard.config import TriggerReversalSettings
    from modelguard.datasets import Dataset
    from modelguard.services.trigger_reversal.service import reversal_plan

    if data is None:
        data = Dataset(torch.empty(0), torch.empty(0, dtype=torch.int64))
    overrides = {
        name: value
        for name in ("norm_scale", "weight_layout")
        if (value := getattr(args, name, None))
    }
    settings = TriggerReversalSettings()
    budgets = {
        name: value
        for name in ("memory_budget_mb", "time_budget_seconds")
        if (value := getattr(args, name, None)) is not None
    }
    return reversal_plan(
        data,
        settings.model_copy(update=budgets),
        steps=getattr(args, "steps", 0) or 0,
        seed=args.seed,
        rule=args.rule,
        detector=getattr(args, "detector", ""),
        overrides=overrides or None,
    )


def reversal_config(args: argparse.Namespace) -> ReversalConfig:
    """The detector's config for the options (see `reversal_plan_of`)."""
    config: ReversalConfig = reversal_plan_of(args).config
    return config


def reverse(
    args: argparse.Namespace, inputs: ModelAndData, reference: LoadedModel | None = None
) -> tuple[DetectionResult, str]:
    """Trigger reversal as the trigger-reversal service runs it, then compared with
    ``reference`` (see `load_reference`) when there is one; the result and the detector's
    name."""
    assert inputs.data is not None
    plan = reversal_plan_of(args, inputs.data)
    with ProgressBoard() as board:
        result = plan.detector.detect(
            inputs.model.module,
            plan.data,
            inputs.spec,
            plan.config,
            progress=board.reporter("reversal"),
        )
    if reference is not None:
        from modelguard.services.trigger_reversal.service import against_reference

        result = against_reference(result, inputs, reference, Path(args.reference).name)
    return result, plan.detector.name


def read_reference(args: argparse.Namespace) -> bytes | None:
    """``--reference``'s bytes, read before the model and data are (a missing file is
    refused at once); None without the option."""
    if not getattr(args, "reference", None):
        return None
    return read_file(args.reference, "reference model")


def load_reference(
    data: bytes | None, args: argparse.Namespace, inputs: ModelAndData
) -> LoadedModel | None:
    """The reference through the services' loader (scanned and refused as ``MODEL`` is),
    with the submitted model's arch, input and class count, before minutes of reversal."""
    from modelguard.jobdata import load_model_from_bytes

    if data is None:
        return None
    classes = inputs.model.num_classes
    return load_model_from_bytes(
        data, inputs.spec, args.arch or "", cli_limits(), num_classes=classes
    )


def add_reference_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reference",
        metavar="MODEL",
        help="a trusted model the submitted one was fine-tuned from (same classes, same "
        "input; any format MODEL takes, with the same --arch): a flagged label whose "
        "reversed trigger the reference follows at least a quarter as often is a natural "
        "trigger inherited from it, reported and not counted as infected",
    )


def add_weight_layout_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weight-layout",
        choices=WEIGHT_LAYOUTS,
        help="layout of the convolution weights during the reversal (repair: the one it "
        "runs without --triggers; default auto: channels-last for inputs of 64² and more, "
        "unless timing both on the model finds it clearly slower; pin one to repeat a run, "
        "up to what a time budget cuts)",
    )


def add_budget_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--memory-budget-mb",
        dest="memory_budget_mb",
        type=int,
        help="peak memory the reversal plans for, in MB (default 4096; label batches are "
        "sized from it)",
    )
    parser.add_argument(
        "--time-budget",
        dest="time_budget_seconds",
        type=float,
        help="seconds the reversal may take (default 480; loading the model and data come "
        "on top); when they run out before the evidence is clear the verdict is "
        "inconclusive, never clean",
    )


def parse_labels(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise InvalidInput(
            f"--target takes labels, comma-separated (e.g. 7 or 1,7); got {value!r}"
        ) from None


def cmd_detect(args: argparse.Namespace) -> int:
    from modelguard.services.trigger_reversal.service import reversal_summary

    reversal_config(args)  # the options, checked before any file is read
    spec = spec_from_args(args)
    reference_bytes = read_reference(args)
    inputs, clean = load_local_inputs(args, spec)
    reference = load_reference(reference_bytes, args, inputs)
    result, detector = reverse(args, inputs, reference)
    summary = reversal_summary(result, detector)  # the stage's, less its store references
    summary.update(data_notes(clean))
    if args.out:
        summary["images"] = save_trigger_images(result, Path(args.out))
        if result.flagged:
            summary["triggers"] = save_flagged_triggers(result, Path(args.out))
    if args.json:
        print_json(summary)
    else:
        print_reversal(summary)
    return verdict_exit([result.verdict], args.fail_on)


def save_flagged_triggers(result: DetectionResult, out: Path) -> str:
    """The flagged labels' triggers as ``triggers.safetensors``: what ``repair --triggers``
    takes, so a repair after a detect need not reverse the triggers again."""
    import torch

    from modelguard.detection.triggers import save_triggers

    labels = list(result.flagged)
    rows = [result.trigger(label) for label in labels]
    masks = torch.stack([mask for mask, _ in rows])
    patterns = torch.stack([pattern for _, pattern in rows])
    path = out / "triggers.safetensors"
    path.write_bytes(save_triggers(masks, patterns, labels))
    err_console.print(f"wrote {path} (repair with --triggers {path})")
    return str(path)


def save_trigger_images(result: DetectionResult, out: Path) -> dict[str, str]:
    """The pictures the service stores, as files: ``label{k}-{mask,pattern,trigger}.png``
    of the flagged labels and of those a reference set aside (of the smallest trigger when
    there are none)."""
    from modelguard.detection.reference import set_aside
    from modelguard.detection.render import PARTS, image_name, trigger_pngs

    out.mkdir(parents=True, exist_ok=True)
    # the triggers a reference comparison set aside too: a reader weighs them by eye
    labels = [*result.flagged, *set_aside(result)]
    if not labels:
        # the smallest trigger among the labels that have one (a triage optimises a few)
        optimised = set(result.labels_with_triggers)
        finite = [r for r in result.labels if r.label in optimised and math.isfinite(r.l1_norm)]
        if not finite:
            err_console.print("no reversed trigger reached its goal: no trigger images written")
            return {}
        labels = [min(finite, key=lambda r: r.l1_norm).label]
    pngs = trigger_pngs(result, labels, scale=8)
    written: dict[str, str] = {}
    for label in labels:
        for part in PARTS:
            path = out / f"label{label}-{part}.png"
            path.write_bytes(pngs[image_name(label, part)])
            written[image_name(label, part)] = str(path)
            err_console.print(f"wrote {path}")
    return written


def cmd_repair(args: argparse.Namespace) -> int:
    from modelguard.detection.triggers import ReversedTrigger, load_triggers
    from modelguard.formats.loader import LoadedModel, save_model
    from modelguard.nn.probe import resolve_layer
    from modelguard.repair.registry import repair
    from modelguard.services.pruning_orchestrator.service import repair_summary

    spec = spec_from_args(args)
    targets = parse_labels(args.target_labels) if args.target_labels else None
    if args.triggers and args.reference:
        raise InvalidInput(
            "--reference applies to the reversal repair runs itself; with --triggers the "
            "given triggers are repaired as they are (choose labels with --target)"
        )
    if not args.triggers:
        reversal_config(args)  # the options, checked before any file is read
    reference_bytes = read_reference(args)
    inputs, clean = load_local_inputs(args, spec)
    model, data = inputs.model, inputs.data
    assert data is not None
    if args.layer:
        resolve_layer(model.module, args.layer, spec)  # before minutes of trigger reversal
    triggers: list[ReversedTrigger]
    if args.triggers:
        triggers = load_triggers(read_file(args.triggers, "triggers"), targets)
    else:
        reference = load_reference(reference_bytes, args, inputs)
        result, _detector = reverse(args, inputs, reference)
        flagged = targets if targets is not None else list(result.flagged)
        if not flagged:
            err_console.print("no backdoor found: nothing to repair (use --target to force)")
            if args.json:
                print_json(
                    {
                        "target_labels": [],
                        "pruned": [],
                        "before": {},
                        "after": {},
                        "curve": [],
                        "seconds": round(result.seconds, 3),
                        **data_notes(clean),
                    }
                )
            return ExitCode.OK
        triggers = [ReversedTrigger(label, *result.trigger(label)) for label in flagged]
    with ProgressBoard() as board:
        repaired = repair(
            model.module,
            data,
            spec,
            triggers,
            mode=args.mode,
            layer=args.layer or None,
            progress=board.reporter("repair"),
        )
    if repaired.model is None:
        raise ModelGuardError("repair returned no model")
    out = LoadedModel(
        module=repaired.model, format=model.format, arch=model.arch, num_classes=model.num_classes
    )
    Path(args.out).write_bytes(save_model(out))
    summary = repair_summary(repaired, args.mode)  # the stage's, less its store references
    summary.update(data_notes(clean))
    if args.json:
        print_json(summary)
    else:
        print_repair(summary)
        out_console.print(f"wrote {args.out}")
    return ExitCode.OK


def cmd_leakscan(args: argparse.Namespace) -> int:
    from modelguard.jobdata import load_model_from_bytes, load_weights_only
    from modelguard.services.leak_detector.service import scan_module

    data = read_file(args.model, "model")
    limits = cli_limits()
    # every path scans the file first: pickles are refused before anything is loaded
    if args.input_shape:
        spec = InputSpec.parse(args.input_shape, args.value_range or "0,1", args.mean, args.std)
        module = load_model_from_bytes(data, spec, args.arch or "", limits).module
    else:
        module = load_weights_only(data, limits)
    verdict, summary = scan_module(module)  # the leak-detector stage's summary
    if args.json:
        print_json(summary)
    else:
        print_leak(summary)
    return verdict_exit([verdict.verdict], args.fail_on)


def parse_eps(value: str) -> tuple[float, ...]:
    """``--eps``: positive numbers, comma-separated, in the data's units."""
    try:
        eps = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        eps = ()
    if not eps or not all(math.isfinite(e) and e > 0 for e in eps):
        raise argparse.ArgumentTypeError(
            f"takes positive numbers in the data's units, comma-separated (e.g. 0.1,0.2,0.3); "
            f"got {value!r}"
        )
    return eps


def parse_fraction(value: str) -> float:
    """An accuracy in [0, 1]."""
    try:
        fraction = float(value)
    except ValueError:
        fraction = math.nan
    if not 0 <= fraction <= 1:
        raise argparse.ArgumentTypeError(f"takes an accuracy in [0, 1]; got {value!r}")
    return fraction


def cmd_robustness(args: argparse.Namespace) -> int:
    from modelguard.robustness.evaluate import RobustnessConfig, evaluate_robustness

    budgets = {
        name: value
        for name in ("memory_budget_mb", "time_budget_seconds")
        if (value := getattr(args, name, None)) is not None
    }
    config = RobustnessConfig(
        eps=args.eps,
        norm=args.norm,
        steps=args.steps,
        restarts=args.restarts,
        targeted=args.targeted,
        max_images=args.attack_images,
        seed=args.seed,
        **budgets,
    )  # the options, checked before any file is read
    spec = spec_from_args(args)
    inputs, clean = load_local_inputs(args, spec)
    assert inputs.data is not None
    with ProgressBoard() as board:
        result = evaluate_robustness(
            inputs.model.module,
            inputs.data,
            spec,
            config,
            progress=board.reporter("robustness"),
        )
    summary = result.to_dict()
    summary.update(data_notes(clean))
    if args.json:
        print_json(summary)
    else:
        print_robustness(summary)
    if args.fail_on_below is None:
        return ExitCode.OK
    # a masked evaluation certifies nothing: it fails the gate like a low figure
    failed_gate = result.below(args.fail_on_below) or result.masking.flagged
    return ExitCode.FINDINGS if failed_gate else ExitCode.OK


# --- carrier serving -----------------------------------------------------------------------
@contextmanager
def carrier_client(args: argparse.Namespace) -> Iterator[CarrierClient]:
    from modelguard.services.carrier_client import CarrierClient

    settings = CliSettings()
    trainer = args.trainer or settings.trainer
    mapper = args.mapper or settings.mapper
    credentials = client_credentials(args)
    if trainer and mapper:
        with CarrierClient(trainer, mapper, timeout=settings.timeout, **credentials) as client:
            yield client
        return
    from modelguard.services.launcher import start_stack

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


def _wait_printer(info: CarrierInfo) -> None:
    err_console.print(
        f"[dim]carrier generation {info.generation}: {job_state_name(info.state)}[/dim]"
    )


def cmd_carrier_request(args: argparse.Namespace) -> int:
    from modelguard.proto.modelguard.v1 import jobs_pb2

    options = jobs_pb2.CarrierOptions(
        steps=args.steps,
        hidden=args.hidden,
        seed=args.seed,
        public_model=args.public_model or "",
        task=args.task or "",
    )
    if args.task_data and args.task:
        raise InvalidInput("give --task or --task-data, not both")
    task_data = carrier_task_data(args) if args.task_data else None
    rotating = args.carrier_command == "rotate"
    with carrier_client(args) as client:
        if task_data is not None:
            options.task_data.CopyFrom(client.upload_task_data(task_data))
        generation, credential = client.request(
            args.user, (args.credential or "") if rotating else "", options
        )
        action = "rotated" if rotating else "enrolled"
        err_console.print(f"{action} {args.user}: carrier generation {generation} is training")
        if not args.json:
            out_console.print(f"credential: {credential}")
        err_console.print(
            "[dim]keep the credential: it is shown once, and only its hash is stored[/dim]"
        )
        embedded = not (
            (args.trainer or CliSettings().trainer) and (args.mapper or CliSettings().mapper)
        )
        document: dict[str, Any] = {
            "user": args.user,
            "action": action,
            "generation": generation,
            "credential": credential,
            "ready": None,
        }
        if args.wait or embedded:
            info = client.wait_ready(args.user, credential, on_wait=_wait_printer)
            manifest = json.loads(client.download(args.user, credential, "manifest"))
            accuracy = manifest.get("validation_accuracy", 0)
            document["ready"] = {"generation": info.generation, "validation_accuracy": accuracy}
            if not args.json:
                out_console.print(
                    f"carrier ready: generation {info.generation}, validation "
                    f"accuracy {accuracy:.2%}"
                )
    if args.json:
        print_json(document)
    return ExitCode.OK


def carrier_task_data(args: argparse.Namespace) -> bytes:
    """``--task-data`` as carrier-trainer takes it: an .npz as it is (the service checks
    it); a folder of images read as the audit reads clean data (``--labels``, fitted to
    ``--input-shape``, in [0, 1]) and sent as the .npz it makes."""
    from modelguard.clean_data import PREDICTED

    path = Path(args.task_data)
    if args.labels == PREDICTED:
        raise InvalidInput(
            f"--labels {PREDICTED} needs a model to label with; a carrier task is trained on "
            "the team's own labels: give class sub-folders or --labels FILE.csv"
        )
    if not path.is_dir():
        if args.labels is not None:
            raise InvalidInput(
                f"--labels {args.labels} needs a folder of images: an .npz carries its labels in y"
            )
        return read_file(args.task_data, "task data")
    if not args.input_shape:
        raise InvalidInput(
            "a folder of task images needs --input-shape C,H,W: the size each image is fitted "
            "to, and the size of the inputs the carrier will classify"
        )
    from modelguard.carrier.task_data import TASK_VALUE_RANGE
    from modelguard.clean_data import read_clean_data
    from modelguard.datasets import dataset_to_npz

    low, high = TASK_VALUE_RANGE
    clean = read_clean_data(
        path,
        InputSpec.parse(args.input_shape, f"{low},{high}"),
        labels=args.labels,
        max_images=args.max_images,
        max_bytes=cli_limits().max_dataset_bytes,
        seed=args.seed,
    )
    print_notes(clean)
    return dataset_to_npz(clean.dataset)


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
        manifest = json.loads(client.download(args.user, args.credential, "manifest"))
        # the carrier's task input (a team's own task has its own; older carriers: MNIST's)
        channels, height, width = manifest.get("task_input_shape", (1, 28, 28))
        x = load_images(args.images, (channels, height, width))
        reply = client.classify_when_loaded(device, x)
    if args.json:
        print_json(
            {
                "labels": reply.labels.tolist(),
                "generation": reply.generation,
                "probabilities": reply.probabilities.round(4).tolist(),
            }
        )
    else:
        for path, label, probs in zip(
            args.images if len(args.images) == len(reply.labels) else range(len(reply.labels)),
            reply.labels,
            reply.probabilities,
            strict=False,
        ):
            out_console.print(f"{path}: {int(label)} (p={float(probs.max()):.3f})")
    return ExitCode.OK


def carrier_document(user: str, info: CarrierInfo) -> dict[str, Any]:
    return {
        "user": user,
        "generation": info.generation,
        "state": job_state_name(info.state),
        "error": info.error.message or None,
    }


def cmd_carrier_revoke(args: argparse.Namespace) -> int:
    with carrier_client(args) as client:
        info = client.revoke(args.user, args.credential or "", args.reason or "")
    if args.json:
        print_json(carrier_document(args.user, info))
    else:
        out_console.print(f"{args.user}: generation {info.generation} revoked")
    return ExitCode.OK


def cmd_token_create(args: argparse.Namespace) -> int:
    from modelguard.auth import Role, mint_token

    role: Role = "admin" if args.admin else "tenant"
    token, line = mint_token(args.tenant, role)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as tokens_file:
            tokens_file.write(line + "\n")
        err_console.print(f"[dim]appended the hashed line to {args.append}[/dim]")
    elif not args.json:
        out_console.print(line, soft_wrap=True)
        err_console.print("[dim]add the line above to MODELGUARD_AUTH_TOKENS_FILE[/dim]")
    if args.json:
        print_json(
            {
                "tenant": args.tenant,
                "role": role,
                "token": token,
                "tokens_file_line": line,
                "appended_to": args.append,
            }
        )
    else:
        print(token)
    err_console.print(
        f"[dim]the token is {args.tenant}'s: shown once, only its hash is stored; "
        "clients send it as MODELGUARD_TOKEN or --token[/dim]"
    )
    return ExitCode.OK


def cmd_keys_rewrap(args: argparse.Namespace) -> int:
    """Re-wrap every stored data key under its tenant's active key-encryption key."""
    from modelguard.runtime import build_store
    from modelguard.store import rewrap_keys

    platform = PlatformSettings()
    if not platform.encrypt_artifacts:
        raise InvalidInput(
            "artifact encryption is off (MODELGUARD_ENCRYPT_ARTIFACTS): nothing to rewrap"
        )
    report = rewrap_keys(build_store(platform), encrypt_plaintext=args.encrypt_plaintext)
    if args.json:
        print_json({**dataclasses.asdict(report), "total": report.total})
        return ExitCode.FAILED if report.failed else ExitCode.OK
    out_console.print(
        f"{report.total} objects: {report.rewrapped} rewrapped, {report.current} already under "
        f"the active key, {report.changed} rewritten meanwhile, {report.plaintext} not "
        f"encrypted, {report.encrypted} encrypted now, {len(report.failed)} failed"
    )
    for reason in report.failed.values():
        err_console.print(f"[red]cannot rewrap:[/red] {escape(reason)}")
    return ExitCode.FAILED if report.failed else ExitCode.OK


def cmd_carrier_status(args: argparse.Namespace) -> int:
    with carrier_client(args) as client:
        info = client.info(args.user, args.credential)
    if args.json:
        print_json(carrier_document(args.user, info))
    else:
        out_console.print(
            f"{args.user}: generation {info.generation}, {job_state_name(info.state)}"
            + (f" ({info.error.message})" if info.error.message else "")
        )
    return ExitCode.OK


# --- scan ----------------------------------------------------------------------------------
def cmd_scan(args: argparse.Namespace) -> int:
    from modelguard.formats.files import sarif_log, scan_paths

    if args.json and args.sarif == "-":
        raise InvalidInput("--json and --sarif - both print on stdout: pick one")
    report = scan_paths([Path(path) for path in args.paths], cli_limits().max_model_bytes)
    if args.sarif:
        log = json.dumps(sarif_log(report, package_version()), indent=2)
        if args.sarif == "-":
            print(log)
        else:
            Path(args.sarif).write_text(log + "\n", encoding="utf-8")
            err_console.print(f"[dim]wrote the SARIF log {args.sarif}[/dim]")
    if args.json:
        print_json(report.to_dict())
    elif args.sarif != "-":
        print_scan(report)
    if report.count("unsafe"):
        return ExitCode.FINDINGS
    return ExitCode.BAD_INPUT if report.count("unreadable") else ExitCode.OK


# --- signatures ----------------------------------------------------------------------------
def cmd_public_key(args: argparse.Namespace) -> int:
    """The public key verifying the deployment's signatures: asked of the orchestrator
    (--target or MODELGUARD_CLI_TARGET), or, for the embedded stack, the public half of
    this machine's signing key (MODELGUARD_SIGNING_KEY_FILE, else the development key)."""
    from modelguard.runtime import load_signer

    if args.target or CliSettings().target:
        with audit_client(args, workers=False) as client:
            key = client.public_key()
    else:
        key = load_signer(PlatformSettings()).published()
    if args.out:
        try:
            Path(args.out).write_text(key.pem, encoding="utf-8")
        except OSError as err:
            raise InvalidInput(f"cannot write {args.out}: {err.strerror}") from None
        err_console.print(f"saved the public key to {escape(args.out)}")
    if args.json:
        print_json(
            {
                "algorithm": key.algorithm,
                "key_id": key.key_id,
                "pem": key.pem,
                "development": key.development,
            }
        )
    elif not args.out:
        print(key.pem, end="")
    err_console.print(f"key id {key.key_id} ({key.algorithm})")
    if key.development:
        err_console.print(DEVELOPMENT_KEY_WARNING)
    return ExitCode.OK


DEVELOPMENT_KEY_WARNING = (
    "[yellow]this is the published development key: anyone can sign with it, so its "
    "signatures prove nothing (servers set MODELGUARD_SIGNING_KEY_FILE)[/yellow]"
)


def cmd_verify(args: argparse.Namespace) -> int:
    """Offline: the file's sha256 against a signature document, with a public key only.
    Exit 0 valid; 1 refused (changed file, another key's or a malformed signature); 2 a
    missing or unreadable file, signature or key."""
    from modelguard.signing import Verifier, signature_path, verify_file

    path = Path(args.file)
    if not path.is_file():
        raise InvalidInput(f"{args.file} is not a file")
    signature_file = Path(args.signature) if args.signature else signature_path(path)
    if not signature_file.is_file():
        raise InvalidInput(
            f"no signature {signature_file}: give --signature SIG (`modelguard audit report` "
            "saves FILE.sig next to each signed file)"
        )
    key_file = args.public_key or CliSettings().public_key_file
    if not key_file:
        raise InvalidInput(
            "give --public-key KEY or set MODELGUARD_CLI_PUBLIC_KEY_FILE (save the "
            "deployment's key once with `modelguard public-key --out KEY`)"
        )
    verifier = Verifier.from_pem(read_file(key_file, "public key"), f"public key {key_file}")
    try:
        signature = verify_file(path, read_file(str(signature_file), "signature"), verifier)
    except IntegrityError as err:
        err_console.print(f"[red]refused:[/red] {escape(f'{path}: {err}')}", soft_wrap=True)
        if args.json:
            print_json({"file": str(path), "valid": False, "reason": str(err)})
        return ExitCode.FINDINGS
    if args.json:
        print_json(
            {
                "file": str(path),
                "valid": True,
                "kind": signature.kind,
                "sha256": signature.sha256,
                "key_id": signature.key_id,
            }
        )
    else:
        out_console.print(
            f"[green]valid:[/green] {escape(str(path))} is the {signature.kind} sha256 "
            f"{signature.sha256} signed by key {signature.key_id}",
            soft_wrap=True,
        )
    if verifier.is_development_key:
        err_console.print(DEVELOPMENT_KEY_WARNING)
    return ExitCode.OK


# --- serve -------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from modelguard.grpc_server import wait_for_termination
    from modelguard.services.launcher import (
        configure_logging,
        configure_tracing,
        run_service,
        start_stack,
    )

    if args.service != "all":
        run_service(args.service)  # one service logs its own address; stdout stays empty
        return ExitCode.OK
    platform = PlatformSettings()
    configure_logging(platform, "modelguard")
    configure_tracing("modelguard")
    stack = start_stack(platform, ephemeral_ports=False)
    if args.json:
        print_json(
            {
                name: {"grpc": app.address, "metrics_port": app.grpc.metrics_port}
                for name, app in stack.apps.items()
            }
        )
        sys.stdout.flush()  # read by whoever started the stack, before it stops
    else:
        for name, app in stack.apps.items():
            err_console.print(f"{name:>22}: gRPC {app.address}, metrics :{app.grpc.metrics_port}")
    wait_for_termination(stack.stop)
    return ExitCode.OK


# --- parser --------------------------------------------------------------------------------
MODEL_HELP = (
    "TorchScript, torch.export (.pt2) or ONNX file, or weights (safetensors, torch.save "
    "state dict) with --arch"
)
ARCH_HELP = "registered architecture of a weights file, e.g. lenet5"
SEED_HELP = "random seed (default 0)"
USER_HELP = "the user's id"
CREDENTIAL_HELP = "the user's credential, as enroll or rotate printed it"
LAYER_HELP = (
    "layer to score and prune: a Linear or Conv2d module name (its output features or "
    "channels), or NAME:in for a Linear layer's input features (default: the first "
    "Linear layer that is not the classifier; fc:in when the classifier is the only one, "
    "as in a ResNet)"
)


def global_options(*, in_subcommand: bool) -> tuple[argparse.ArgumentParser, ...]:
    """The options accepted before the subcommand and after it: common to all commands
    (``-v``, ``--json``), of those that call servers (``--token``, ``--tls-*``) and of the
    audit commands (``--target``). A subcommand's copy has no default (SUPPRESS), so that
    it keeps a value given before the subcommand instead of resetting it."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if in_subcommand else value

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=default(False), help="log at INFO level"
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="machine-readable output: JSON on stdout and nothing else there (progress and "
        "messages go to stderr)",
    )
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--token", default=default(None), help="bearer token (default: MODELGUARD_TOKEN)"
    )
    connection.add_argument(
        "--tls-ca", default=default(None), help="CA (PEM) verifying the servers: use TLS"
    )
    connection.add_argument(
        "--tls-cert", default=default(None), help="client certificate (PEM) for mTLS"
    )
    connection.add_argument(
        "--tls-key", default=default(None), help="key (PEM) of the client certificate"
    )
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument(
        "--target",
        default=default(None),
        help="host:port of the pruning-orchestrator, for the audit commands (default: "
        "MODELGUARD_CLI_TARGET; none: an embedded stack in this process)",
    )
    return common, connection, target


def add_fail_on_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fail-on",
        type=parse_fail_on,
        metavar="infected|leak|inconclusive|any",
        help="exit 1 when the verdict is one of these (comma-separated; any: all three), "
        "for a CI gate",
    )


def build_parser() -> argparse.ArgumentParser:
    from modelguard.repair.registry import DEFAULT_REPAIR_MODE, REPAIR_CHOICES, REPAIR_MODES

    top_common, top_connection, top_target = global_options(in_subcommand=False)
    common, connection, target = global_options(in_subcommand=True)
    parser = argparse.ArgumentParser(
        prog="modelguard",
        description=__doc__.split("\n\n")[0],
        epilog=EXIT_CODES_HELP,
        parents=[top_common, top_connection, top_target],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(
        group: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        helptext: str,
        *parents: argparse.ArgumentParser,
    ) -> argparse.ArgumentParser:
        return group.add_parser(
            name,
            help=helptext,
            description=helptext,
            epilog=EXIT_CODES_HELP,
            parents=[common, *parents],
        )

    audit = commands.add_parser("audit", help="submit and inspect audits").add_subparsers(
        dest="audit_command", required=True
    )
    submit = command(
        audit, "submit", "submit a model and clean data for an audit", connection, target
    )
    submit.add_argument(
        "model",
        help="TorchScript, torch.export (.pt2) or ONNX file, or weights (safetensors) with --arch",
    )
    submit.add_argument("--arch", help=ARCH_HELP)
    add_data_args(submit)
    add_spec_args(submit)
    submit.add_argument(
        "--repair-mode",
        default=DEFAULT_REPAIR_MODE,
        choices=REPAIR_CHOICES,
        help=f"how a flagged model is repaired (default {DEFAULT_REPAIR_MODE})",
    )
    submit.add_argument("--layer", help=LAYER_HELP)
    submit.add_argument("--steps", type=int, default=0, help="reversal steps (0: default)")
    add_rule_arg(submit)
    submit.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    add_reference_arg(submit)
    submit.add_argument(
        "--eps",
        type=parse_eps,
        help="also run the robustness stage: robust accuracy at these perturbation budgets, "
        "in the data's own units, comma-separated (e.g. 0.1,0.2,0.3); without it the stage "
        "does not run",
    )
    submit.add_argument(
        "--norm",
        choices=("linf", "l2"),
        default="linf",
        help="the robustness budget's norm (default linf)",
    )
    submit.add_argument(
        "--attack-steps",
        type=int,
        default=0,
        help="PGD steps of the robustness stage (0: default, 20)",
    )
    submit.add_argument("--wait", action="store_true", help="wait for the audit to finish")
    add_fail_on_arg(submit)
    submit.set_defaults(func=cmd_audit_submit)
    show = command(audit, "show", "show an audit", connection, target)
    show.add_argument("audit_id", help="the audit's id, as submit printed it")
    show.set_defaults(func=cmd_audit_show)
    report = command(audit, "report", "download an audit's report", connection, target)
    report.add_argument("audit_id", help="the audit's id, as submit printed it")
    report.add_argument("--out", required=True, help="directory for the report files")
    report.set_defaults(func=cmd_audit_report)
    listing = command(audit, "list", "list recent audits", connection, target)
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    listing.set_defaults(func=cmd_audit_list)

    scan = command(
        commands,
        "scan",
        "scan model files for code they could run when loaded, loading nothing (pickle, "
        "torch zip, TorchScript, torch.export, safetensors, ONNX); exit 1 on findings",
    )
    scan.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="model files, or folders walked for files with a model suffix",
    )
    scan.add_argument(
        "--sarif",
        metavar="FILE",
        help="also write the findings as a SARIF 2.1.0 log to FILE (- for stdout)",
    )
    scan.set_defaults(func=cmd_scan)

    detect = command(commands, "detect", "detect a backdoor in one model, in-process")
    detect.add_argument("model", help=MODEL_HELP)
    detect.add_argument("--arch", help=ARCH_HELP)
    add_data_args(detect)
    add_spec_args(detect)
    detect.add_argument("--steps", type=int, default=0, help="reversal steps (0: default)")
    detect.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    add_rule_arg(detect)
    detect.add_argument(
        "--norm-scale",
        choices=("log", "linear"),
        help="scale of the MAD test only (default: the rule's; modelguard: log); the size "
        "rule, screening and restarts stay: Neural Cleanse's original test is --rule paper",
    )
    add_weight_layout_arg(detect)
    add_budget_args(detect)
    add_reference_arg(detect)
    detect.add_argument("--out", help="directory for the reversed trigger images")
    add_fail_on_arg(detect)
    detect.set_defaults(func=cmd_detect)

    repair_cmd = command(commands, "repair", "repair a backdoored model, in-process")
    repair_cmd.add_argument("model", help=MODEL_HELP)
    repair_cmd.add_argument("--arch", help=ARCH_HELP)
    add_data_args(repair_cmd)
    add_spec_args(repair_cmd)
    repair_cmd.add_argument(
        "--mode",
        default=DEFAULT_REPAIR_MODE,
        choices=list(REPAIR_MODES),
        help=f"repair method (default {DEFAULT_REPAIR_MODE})",
    )
    repair_cmd.add_argument("--layer", help=LAYER_HELP)
    add_rule_arg(repair_cmd)
    add_weight_layout_arg(repair_cmd)
    add_budget_args(repair_cmd)
    add_reference_arg(repair_cmd)
    repair_cmd.add_argument("--triggers", help="reversed triggers (safetensors) to use")
    repair_cmd.add_argument(
        "--target",
        dest="target_labels",
        help="target label(s) to repair, comma-separated (default: the flagged ones)",
    )
    repair_cmd.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    repair_cmd.add_argument("--out", required=True, help="where to write the repaired model")
    repair_cmd.set_defaults(func=cmd_repair)

    leak = command(commands, "leakscan", "check a model for smuggled training data")
    leak.add_argument("model", help=MODEL_HELP)
    leak.add_argument("--arch", help=ARCH_HELP)
    leak.add_argument("--input-shape", help="optional: C,H,W, to also check the model runs")
    leak.add_argument("--value-range", help="MIN,MAX of the data (default 0,1)")
    leak.add_argument("--mean", help="per-channel mean the model normalises with")
    leak.add_argument("--std", help="per-channel std the model normalises with")
    add_fail_on_arg(leak)
    leak.set_defaults(func=cmd_leakscan)

    robust = command(
        commands,
        "robustness",
        "robust accuracy under evasion attacks (FGSM, PGD) against ε, with a gradient-masking "
        "check, in-process",
    )
    robust.add_argument("model", help=MODEL_HELP)
    robust.add_argument("--arch", help=ARCH_HELP)
    add_data_args(robust)
    add_spec_args(robust)
    robust.add_argument(
        "--eps",
        type=parse_eps,
        required=True,
        help="perturbation budgets in the data's own units (the value range, before any "
        "--mean/--std), comma-separated, e.g. 0.1,0.2,0.3 for MNIST in 0,1",
    )
    robust.add_argument(
        "--norm", choices=("linf", "l2"), default="linf", help="the budget's norm (default linf)"
    )
    robust.add_argument("--steps", type=int, default=20, help="PGD steps (default 20)")
    robust.add_argument(
        "--restarts", type=int, default=1, help="PGD runs from random starts (default 1)"
    )
    robust.add_argument(
        "--targeted",
        action="store_true",
        help="targeted attacks: each image towards a random other label (seeded)",
    )
    robust.add_argument(
        "--attack-images",
        type=int,
        default=500,
        help="attack at most this many images, a seeded subset (default 500; the time "
        "budget may take fewer, and says so)",
    )
    robust.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    robust.add_argument(
        "--memory-budget-mb",
        dest="memory_budget_mb",
        type=int,
        help="peak memory the attacks plan for, in MB (default 4096; the batch is sized from it)",
    )
    robust.add_argument(
        "--time-budget",
        dest="time_budget_seconds",
        type=float,
        help="seconds the attacks may take (default 480; fewer images are attacked to fit, "
        "and a run that still overruns reports the images done)",
    )
    robust.add_argument(
        "--fail-on-below",
        type=parse_fraction,
        metavar="ACC",
        help="exit 1 when the robust accuracy at some ε is below ACC (0..1), or when the "
        "gradient-masking check flags the evaluation, for a CI gate",
    )
    robust.set_defaults(func=cmd_robustness)

    carrier = commands.add_parser(
        "carrier", help="carrier-based serving: enrol, classify, rotate"
    ).add_subparsers(dest="carrier_command", required=True)
    requests = []
    for name, helptext in (
        ("enroll", "enrol a user: train its carrier and mapper"),
        ("rotate", "rotate a user's carrier (revokes the old one now)"),
    ):
        sub = command(carrier, name, helptext, connection)
        sub.add_argument("--user", required=True, help=USER_HELP)
        if name == "rotate":
            sub.add_argument("--credential", help="the user's (omit with an admin token)")
        sub.add_argument("--steps", type=int, default=0, help="training steps (0: default)")
        sub.add_argument("--hidden", type=int, default=0, help="mapper hidden width")
        sub.add_argument("--seed", type=int, default=0, help=SEED_HELP)
        sub.add_argument(
            "--public-model",
            help="lenet5-fashion-conv (default), lenet5-fashion-features, lenet5-fashion or "
            "efficientnet-lite0",
        )
        sub.add_argument("--task", help="dataset the mapper classifies (default mnist)")
        add_task_data_args(sub)
        sub.add_argument("--wait", action="store_true", help="wait until the carrier is trained")
        sub.set_defaults(func=cmd_carrier_request)
        requests.append(sub)
    classify = command(carrier, "classify", "classify images through your carrier", connection)
    classify.add_argument("images", nargs="+", help="image files, or one .npz with x")
    classify.add_argument("--user", required=True, help=USER_HELP)
    classify.add_argument("--credential", required=True, help=CREDENTIAL_HELP)
    classify.set_defaults(func=cmd_carrier_classify)
    status = command(carrier, "status", "show a user's carrier", connection)
    status.add_argument("--user", required=True, help=USER_HELP)
    status.add_argument("--credential", required=True, help=CREDENTIAL_HELP)
    status.set_defaults(func=cmd_carrier_status)
    revoke = command(
        carrier,
        "revoke",
        "revoke a user's carrier now (its credential, or an admin token)",
        connection,
    )
    revoke.add_argument("--user", required=True, help=USER_HELP)
    revoke.add_argument("--credential", help="the user's (omit with an admin token)")
    revoke.add_argument("--reason", help="recorded with the revocation")
    revoke.set_defaults(func=cmd_carrier_revoke)
    for sub in (classify, status, revoke, *requests):
        sub.add_argument("--trainer", help="host:port of carrier-trainer (default: embedded)")
        sub.add_argument("--mapper", help="host:port of result-mapper (default: embedded)")

    token = commands.add_parser("token", help="API tokens").add_subparsers(
        dest="token_command", required=True
    )
    create = command(
        token, "create", "mint a bearer token: prints the tokens-file line and the token"
    )
    create.add_argument("--tenant", required=True, help="tenant id the token acts for")
    create.add_argument("--admin", action="store_true", help="an admin token (all tenants)")
    create.add_argument("--append", metavar="FILE", help="append the line to this tokens file")
    create.set_defaults(func=cmd_token_create)

    public_key = command(
        commands,
        "public-key",
        "print or save the public key that verifies the signatures (asked of the "
        "orchestrator with --target, else this machine's signing key)",
        connection,
        target,
    )
    public_key.add_argument("--out", help="write the PEM to this file instead of stdout")
    public_key.set_defaults(func=cmd_public_key)

    verify = command(
        commands,
        "verify",
        "check a downloaded report or repaired model against its signature, offline: exit 0 "
        "valid; 1 refused (the file changed, another key signed it, or the signature is "
        "malformed); 2 a missing or unreadable file, signature or key",
    )
    verify.add_argument("file", help="the downloaded file")
    verify.add_argument("--signature", help="its signature document (default: FILE.sig)")
    verify.add_argument(
        "--public-key",
        help="the deployment's public key, PEM (default: MODELGUARD_CLI_PUBLIC_KEY_FILE)",
    )
    verify.set_defaults(func=cmd_verify)
    keys = commands.add_parser("keys", help="artifact encryption keys").add_subparsers(
        dest="keys_command", required=True
    )
    rewrap = command(
        keys,
        "rewrap",
        "re-wrap every stored data key under its tenant's active key (after a rotation; "
        "ciphertexts stay as they are)",
    )
    rewrap.add_argument(
        "--encrypt-plaintext",
        action="store_true",
        help="also encrypt objects written before encryption was on (stop the services first)",
    )
    rewrap.set_defaults(func=cmd_keys_rewrap)

    serve = command(commands, "serve", "run one service, or all six (embedded)")
    serve.add_argument(
        "service",
        choices=[*SERVICES, "all"],
        help="the service to run, or all (with --json: their addresses on stdout)",
    )
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
        err_console.print(f"[red]error:[/red] {escape(str(err))}")
        return ExitCode.BAD_INPUT
    except ModelGuardError as err:
        err_console.print(f"[red]error:[/red] {escape(str(err))}")
        return ExitCode.FAILED
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
