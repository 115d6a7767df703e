"""`make demo`: the main job on embedded defaults.

All six services run in this process on an in-memory bus with a local artifact
directory. The demo trains (or loads from its cache) a LeNet-5 on MNIST with a BadNets
backdoor, submits it for an audit through the orchestrator's gRPC API, follows the audit
as it travels through the stages, and writes the report, the reversed trigger and the
repaired model to ``demo-out/``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from modelguard.config import PlatformSettings
from modelguard.datasets import Dataset, dataset_to_npz, load_mnist
from modelguard.formats.loader import load_model, weights_to_safetensors
from modelguard.nn.training import accuracy
from modelguard.proto.modelguard.v1 import jobs_pb2
from modelguard.services.audit_client import AuditClient, write_signed
from modelguard.services.launcher import start_stack
from modelguard.services.present import print_audit, watch
from modelguard.spec import InputSpec

console = Console()
CACHE = Path(".cache/demo")
SPEC = InputSpec(shape=(1, 28, 28), value_range=(0.0, 1.0))


def infected_model(train: Dataset, test: Dataset, seed: int = 0) -> tuple[bytes, Any]:
    """LeNet-5 with a 4×4 white patch near the bottom-right corner that flips any digit to
    7 (BadNets). Cached, so a second demo run skips training."""
    from modelguard.attacks.backdoor import PatchTrigger, train_backdoored

    trigger = PatchTrigger(target=7, size=4, position=(-2, -2), pattern="white")
    path = CACHE / f"lenet5-badnets-seed{seed}.safetensors"
    if path.exists():
        return path.read_bytes(), trigger
    CACHE.mkdir(parents=True, exist_ok=True)
    console.print("training an infected LeNet-5 on MNIST (BadNets, target 7; ~1 min) …")
    model = train_backdoored("lenet5", (train, test), [trigger], seed=seed).model
    data = weights_to_safetensors(model)
    path.write_bytes(data)
    return data, trigger


def save_trigger_images(client: AuditClient, audit: Any, out: Path) -> None:
    """The reversed trigger of each flagged label, as PNG files next to the report."""
    import json

    from modelguard.proto.modelguard.v1 import common_pb2

    for stage in audit.stages:
        if stage.stage != "trigger-reversal" or not stage.summary_json:
            continue
        for name, ref in json.loads(stage.summary_json).get("images", {}).items():
            path = out / (name.replace(" ", "-") + ".png")
            path.write_bytes(client.download(common_pb2.ArtifactRef(**ref)))
            console.print(f"reversed trigger image: {path}")


def carrier_demo(stack: Any, test: Dataset, steps: int, out: Path) -> None:
    """Carrier serving: a user enrols, classifies digits through carrier + public model +
    result-mapper, and the carrier is rotated: the old credential stops working at once."""
    from modelguard.errors import ModelGuardError
    from modelguard.proto.modelguard.v1 import jobs_pb2
    from modelguard.services.carrier_client import CarrierClient

    console.rule("[bold]4. Carrier-based serving")
    options = jobs_pb2.CarrierOptions(steps=steps)
    digits = test.subset(200, seed=1)
    with CarrierClient(stack["carrier-trainer"].address, stack["result-mapper"].address) as client:
        started = time.perf_counter()
        console.print(
            "enrolling alice: training her carrier and mapping network "
            "(public model: LeNet-5 trained on Fashion-MNIST, frozen) …"
        )
        _, credential = client.request("alice", options=options)
        client.wait_ready("alice", credential)
        (out / "alice-carrier.png").write_bytes(client.download("alice", credential, "carrier_png"))
        device = client.device("alice", credential)
        reply = client.classify_when_loaded(device, digits.x)
        correct = float((torch.from_numpy(reply.labels) == digits.y).float().mean())
        console.print(
            f"carrier ready in {time.perf_counter() - started:.0f} s; alice's device "
            f"classified {len(digits)} MNIST digits through the Fashion-MNIST model: "
            f"{correct:.1%} correct (first five: {reply.labels[:5].tolist()}, "
            f"true {digits.y[:5].tolist()})"
        )
        console.print(f"alice's carrier image: {out / 'alice-carrier.png'}")
        console.print("rotating alice's carrier …")
        _, new_credential = client.request("alice", credential, options)
        try:
            device.classify(digits.x[:1])
            console.print("[red]the old carrier still worked after rotation[/red]")
        except ModelGuardError as err:
            console.print(f"old carrier refused at once: {err}")
        client.wait_ready("alice", new_credential)
        device = client.device("alice", new_credential)
        reply = client.classify_when_loaded(device, digits.x)
        correct = float((torch.from_numpy(reply.labels) == digits.y).float().mean())
        console.print(f"new carrier (generation {reply.generation}): {correct:.1%} correct")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--carrier-steps",
        type=int,
        default=1500,
        help="carrier training steps (the service default trains longer)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    from modelguard.attacks.backdoor import attack_success_rate

    train, test = load_mnist("train"), load_mnist("test")
    model_bytes, trigger = infected_model(train, test, args.seed)
    model = load_model(model_bytes, SPEC, arch="lenet5").module
    defender = test.subset(1000, seed=args.seed)  # the defender's small clean set
    holdout = Dataset(test.x[5000:], test.y[5000:])
    console.rule("[bold]1. An infected model")
    console.print(
        f"clean accuracy {accuracy(model, holdout):.2%}, attack success rate "
        f"{attack_success_rate(model, holdout, trigger):.2%} (real trigger)"
    )

    (out / "model.safetensors").write_bytes(model_bytes)
    (out / "clean.npz").write_bytes(dataset_to_npz(defender))

    console.rule("[bold]2. Audit through the six services (embedded mode)")
    platform = PlatformSettings(store_dir=out / "store")
    started = time.perf_counter()
    with start_stack(platform) as stack, AuditClient(stack.orchestrator_address) as client:
        options = jobs_pb2.AuditOptions(seed=args.seed)  # the default repair mode
        audit = client.submit(
            out / "model.safetensors", out / "clean.npz", SPEC, arch="lenet5", options=options
        )
        console.print(f"submitted audit {audit.audit_id}")
        audit = watch(client, audit.audit_id)
        print_audit(audit)
        for ref, name in (
            (audit.report_json, "report.json"),
            (audit.report_html, "report.html"),
            (audit.repaired_model, "repaired.safetensors"),
        ):
            if ref.sha256:
                write_signed(audit, ref, out / name, client.download(ref))  # and name.sig
        save_trigger_images(client, audit, out)
        console.print(f"audit took {time.perf_counter() - started:.1f} s")

        console.rule("[bold]3. The repaired model, checked with the real trigger")
        repaired_path = out / "repaired.safetensors"
        if repaired_path.exists():
            repaired = load_model(repaired_path.read_bytes(), SPEC, arch="lenet5").module
            console.print(
                f"clean accuracy {accuracy(repaired, holdout):.2%} "
                f"(was {accuracy(model, holdout):.2%}), attack success rate "
                f"{attack_success_rate(repaired, holdout, trigger):.2%} "
                f"(was {attack_success_rate(model, holdout, trigger):.2%})"
            )
        console.print(f"report: {out / 'report.html'}")
        carrier_demo(stack, test, args.carrier_steps, out)


if __name__ == "__main__":
    main()
