"""carrier-trainer, transport-neutral: enrol and rotate users, train their carriers and
mapping networks (adversarial reprogramming), and hand devices their carrier.

Credentials are per (user, carrier generation): rotating a carrier issues a new one, so a
thief holding a device's credential cannot fetch the next carrier. Only salted hashes are
stored; the plain credential is returned once, to the caller who enrolled or rotated.

Who may do what (``caller`` is the bearer-token identity; None: authentication off):
enrolling a new user needs an admin token; rotating or revoking needs the user's
credential, or an admin token without it; reading a carrier (GetCarrier, DownloadCarrier)
needs the user's credential (an admin may read the state without it, never the carrier).
A tenant may only name task data it uploaded itself (an admin, any uploaded task data).
"""

from __future__ import annotations

import io
import json
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from modelguard.auth import Identity, require_admin
from modelguard.carrier.mapper_registry import hash_credential, new_credential, verify_credential
from modelguard.carrier.records import (
    FAILED,
    QUEUED,
    READY,
    REVOKED,
    TRAINING,
    CarrierRecord,
    CarrierRepository,
    check_user_id,
)
from modelguard.config import CarrierTrainerSettings
from modelguard.convert import ref_from_proto, ref_to_proto
from modelguard.datasets import Dataset, load_named
from modelguard.errors import InvalidInput, NotFound, PermissionDenied, Unauthenticated
from modelguard.metrics import ServiceMetrics
from modelguard.plots import tensor_png
from modelguard.proto.modelguard.v1 import jobs_pb2
from modelguard.runtime import Runtime
from modelguard.stage import publish_proto
from modelguard.store.base import ArtifactRef, join_upload
from modelguard.topics import CARRIER_READY, CARRIER_REQUESTED, CARRIER_REVOKED, JOB_CARRIER

if TYPE_CHECKING:
    from modelguard.carrier.carrier import CarrierConfig
    from modelguard.carrier.task_data import TaskData

log = logging.getLogger(__name__)

MAX_HIDDEN = 4096
MAX_STEPS = 1_000_000
TASKS = ("mnist", "fashion-mnist")
ARTIFACTS = ("carrier", "carrier_png", "mapper", "manifest", "public_model", "profile")
#: Marks a blob as a task dataset uploaded here: a request may only name one of these, not
#: any blob of the shared store (another tenant's audit data, say).
TASK_DATA_PREFIX = "carrier-task-data/"
#: One empty document per (task dataset, tenant that uploaded it), so that a tenant who
#: learns another's digest cannot train on its data. A document per pair makes a grant an
#: idempotent write: two replicas granting the same bytes to two tenants lose neither.
TASK_DATA_TENANTS_PREFIX = "carrier-task-data-tenants/"
#: The ``task`` recorded for a team's own dataset (``CarrierOptions.task_data``).
CUSTOM_TASK = "custom"
#: What a device may download; the mapper and the query profile stay on the server (the
#: profile would tell an attacker how to shape queries that pass the extraction detector).
DEVICE_ARTIFACTS = ("carrier", "carrier_png", "manifest", "public_model")


def ref_dict(ref: ArtifactRef) -> dict[str, Any]:
    return {"sha256": ref.sha256, "key": ref.key, "size": ref.size, "media_type": ref.media_type}


def ref_from_dict(data: dict[str, Any]) -> ArtifactRef:
    return ArtifactRef(data["sha256"], data["key"], int(data["size"]), data["media_type"])


def carrier_config(
    settings: CarrierTrainerSettings,
    seed: int,
    hidden: int = 0,
    steps: int = 0,
    gamma: float = 0.0,
    validation_samples: int = 0,
) -> CarrierConfig:
    """The training configuration carrier-trainer uses for one carrier: the request's
    options where given (0: unset), else the service's settings, else the algorithm's
    defaults. The carrier benchmark measures this same configuration.
    ``validation_samples``: held-out samples (0: the algorithm's default; a team's own,
    smaller task holds out a share of its data instead)."""
    from modelguard.carrier.carrier import CarrierConfig  # torch: imported late

    overrides: dict[str, Any] = {
        "seed": seed,
        "hidden": hidden or settings.hidden,
        "time_budget_s": settings.time_budget_seconds,
    }
    if steps or settings.steps:
        overrides["max_steps"] = steps or settings.steps
    # a decaying schedule runs to its end: its last, small steps are where the validation
    # accuracy settles, so the convergence stop must not cut it short
    max_steps = overrides.get("max_steps", CarrierConfig.max_steps)
    overrides["lr_schedule"] = "cosine"
    overrides["patience"] = max_steps // CarrierConfig.eval_every + 1
    if gamma:
        overrides["gamma"] = gamma
    if validation_samples:
        overrides["validation_samples"] = validation_samples
    return CarrierConfig(**overrides)


class CarrierService:
    def __init__(
        self, runtime: Runtime, settings: CarrierTrainerSettings, metrics: ServiceMetrics
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics
        self.repository = CarrierRepository(runtime.store)
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self.carriers = metrics.counter("carriers_total", "Carrier requests by kind.", ("kind",))
        self.accuracy = metrics.gauge(
            "last_mapped_accuracy", "Validation accuracy of the last trained carrier."
        )
        self.training_seconds = metrics.histogram(
            "training_seconds",
            "Wall time of one carrier training.",
            (5, 10, 30, 60, 120, 300, 600, 1200),
        )

    # --- enrolment and rotation ----------------------------------------------------------
    def request(
        self,
        user_id: str,
        options: jobs_pb2.CarrierOptions,
        credential: str = "",
        caller: Identity | None = None,
    ) -> tuple[int, str]:
        """Enrol ``user_id`` (no carrier yet; an admin operation) or rotate its carrier
        (``credential`` of the current or last revoked generation, or an admin caller).
        Returns (generation, credential)."""
        check_user_id(user_id)
        with self._locks[user_id]:
            current = self.repository.find(user_id)
            if current is None:
                require_admin(caller, "enrolling a new carrier user")
            else:
                self._check_owner(current, credential, caller, "rotating")
            generation = current.generation + 1 if current else 1
            issued = new_credential()
            merged = self._options(options, caller)
            record = CarrierRecord(
                user_id,
                generation,
                hash_credential(issued),
                options=json_format.MessageToDict(merged),
            )
            self.repository.put(record)
            if current is not None and current.state != REVOKED:
                # the old carrier stops working at once, not when the new one is ready
                self.publish_revoked(user_id, current.generation, "rotated")
            publish_proto(
                self.runtime.bus,
                CARRIER_REQUESTED,
                jobs_pb2.CarrierRequested(user_id=user_id, generation=generation, options=merged),
                key=user_id,
                job_type=JOB_CARRIER,
            )
        self.carriers.labels("rotation" if current else "enrolment").inc()
        return generation, issued

    def _options(
        self, options: jobs_pb2.CarrierOptions, caller: Identity | None
    ) -> jobs_pb2.CarrierOptions:
        """Defaults filled in and every option checked now: a request the trainer would
        refuse later must not revoke the user's working carrier first."""
        from modelguard.carrier.public_models import PUBLIC_MODELS

        merged = jobs_pb2.CarrierOptions()
        merged.CopyFrom(options)
        merged.public_model = options.public_model or self.settings.public_model
        custom = bool(options.task_data.sha256)
        merged.task = CUSTOM_TASK if custom else options.task or self.settings.task
        merged.hidden = options.hidden or self.settings.hidden
        merged.steps = options.steps or self.settings.steps
        problems = []
        if not 0 <= merged.hidden <= MAX_HIDDEN:
            problems.append(f"hidden must be 0..{MAX_HIDDEN}")
        if not 0 <= merged.steps <= MAX_STEPS:
            problems.append(f"steps must be 0..{MAX_STEPS}")
        if not (math.isfinite(options.gamma) and 0 <= options.gamma <= 1):
            problems.append("gamma must be in [0, 1]")
        if merged.public_model not in PUBLIC_MODELS:
            problems.append(f"public model must be one of {', '.join(PUBLIC_MODELS)}")
        if custom and options.task not in ("", CUSTOM_TASK):
            problems.append(f"give a task ({options.task!r}) or task data, not both")
        elif not custom and merged.task not in TASKS:
            problems.append(f"task must be one of {', '.join(TASKS)} (or send your own task data)")
        if problems:
            raise InvalidInput("invalid carrier options: " + "; ".join(problems))
        if custom:
            # a bad dataset is refused now, with its problem named, not after minutes of
            # queueing and a failed training
            self.task_data(merged, caller)
        return merged

    # --- a team's own task --------------------------------------------------------------------
    def upload_task_data(
        self, chunks: Iterable[tuple[bytes, str]], caller: Identity | None = None
    ) -> ArtifactRef:
        """Store a streamed task dataset (.npz) for the calling tenant; its reference goes
        in ``CarrierOptions.task_data``. It is checked when a carrier is requested for it."""
        data, media_type = join_upload(chunks, self.runtime.platform.max_dataset_bytes)
        ref = self.runtime.store.put_blob(data, media_type)
        self.runtime.store.put_doc(TASK_DATA_PREFIX + ref.sha256, b"{}")
        if caller is not None:
            # the same bytes uploaded by two tenants belong to both: each had them anyway
            self.runtime.store.put_doc(_tenant_marker(ref.sha256, caller.tenant), b"")
        return ref

    def task_data(
        self, options: jobs_pb2.CarrierOptions, caller: Identity | None = None
    ) -> TaskData:
        """The checked custom task of ``options`` (for its public model). A tenant
        ``caller`` may only name task data it uploaded; an admin, or no caller (authentication
        off, or the training job of a request checked when it was made), any task data."""
        from modelguard.carrier.public_models import load_public_model
        from modelguard.carrier.task_data import load_task_data

        ref = ref_from_proto(options.task_data, "task data")
        marker = TASK_DATA_PREFIX + ref.sha256
        if caller is not None and not caller.admin:
            marker = _tenant_marker(ref.sha256, caller.tenant)
        try:
            self.runtime.store.get_doc(marker)
        except NotFound:
            # the same answer as for data never uploaded: another tenant's digest stays secret
            raise InvalidInput(
                f"task data {ref.sha256[:12]}… was not uploaded to carrier-trainer: send it "
                "with UploadTaskData first"
            ) from None
        limit = self.runtime.platform.max_dataset_bytes
        if ref.size > limit:
            raise InvalidInput(f"task data is {ref.size} bytes; the limit is {limit}")
        public = load_public_model(options.public_model or self.settings.public_model)
        return load_task_data(self.runtime.store.get_blob(ref.sha256), public.input_shape)

    def _check_owner(
        self, record: CarrierRecord, credential: str, caller: Identity | None, action: str
    ) -> None:
        """The user's own credential, or (when none is given) an admin caller."""
        if credential:
            if not verify_credential(credential, record.credential_hash):
                raise PermissionDenied(f"this credential does not belong to {record.user_id!r}")
            return
        if caller is not None and caller.admin:
            return
        raise Unauthenticated(
            f"user {record.user_id!r} is enrolled: {action} needs its current credential"
            + (" (or an admin token)" if caller is not None else "")
        )

    def revoke(
        self, user_id: str, credential: str, reason: str = "", caller: Identity | None = None
    ) -> CarrierRecord:
        """Revoke the user's current carrier at once: the mapper stops answering on every
        replica (CarrierRevoked). Idempotent."""
        check_user_id(user_id)
        with self._locks[user_id]:
            record = self.repository.get(user_id)
            self._check_owner(record, credential, caller, "revoking")
            if record.state != REVOKED:
                who = f"admin {caller.tenant}" if caller is not None and caller.admin else "user"
                record.state = REVOKED
                record.revoked_reason = (reason or "revoked")[:200] + f" (by {who})"
                self.repository.put(record)
                self.publish_revoked(user_id, record.generation, record.revoked_reason)
                self.carriers.labels("revoked").inc()
        return record

    def publish_revoked(self, user_id: str, generation: int, reason: str) -> None:
        publish_proto(
            self.runtime.bus,
            CARRIER_REVOKED,
            jobs_pb2.CarrierRevoked(user_id=user_id, generation=generation, reason=reason),
            key=user_id,
            job_type=JOB_CARRIER,
        )

    def on_revoked(self, event: jobs_pb2.CarrierRevoked) -> None:
        """Record a revocation made elsewhere (result-mapper on suspected extraction)."""
        with self._locks[event.user_id]:
            record = self.repository.find(event.user_id)
            if record is None or record.generation != event.generation:
                return
            if record.state != REVOKED:
                record.state = REVOKED
                record.revoked_reason = event.reason
                self.repository.put(record)
                self.carriers.labels("revoked").inc()

    # --- the device's view ----------------------------------------------------------------
    def authorised(
        self, user_id: str, credential: str, caller: Identity | None = None
    ) -> CarrierRecord:
        """The user's record, for its own credential (or, to read the state only, an
        admin caller without one)."""
        record = self.repository.get(user_id)
        if not credential and caller is not None and caller.admin:
            return record
        if not credential:
            raise Unauthenticated("send the credential issued with the carrier")
        if not verify_credential(credential, record.credential_hash):
            raise PermissionDenied(f"this credential does not belong to {user_id!r}")
        return record

    def download(self, user_id: str, credential: str, artifact: str) -> tuple[bytes, str]:
        if artifact not in DEVICE_ARTIFACTS:
            allowed = ", ".join(DEVICE_ARTIFACTS)
            raise InvalidInput(f"artifact {artifact!r} unknown; devices may fetch: {allowed}")
        record = self.authorised(user_id, credential)
        if record.state == REVOKED:
            raise NotFound(f"carrier generation {record.generation} of {user_id!r} is revoked")
        if record.state != READY:
            raise NotFound(f"the carrier of {user_id!r} is not ready yet ({record.state})")
        ref = ref_from_dict(record.artifacts[artifact])
        data = self.runtime.store.get_blob(ref)
        self.runtime.signer.verify(ref.sha256, record.signatures.get(artifact, ""), artifact)
        return data, ref.media_type

    # --- training (the Kafka job) ------------------------------------------------------------
    def train(self, job: jobs_pb2.CarrierRequested, progress: Any = None) -> None:
        from modelguard.carrier.carrier import (
            carrier_to_safetensors,
            mapper_to_safetensors,
            train_carrier,
        )
        from modelguard.carrier.natural_images import natural_image_for_user
        from modelguard.carrier.public_models import load_public_model

        user_id, generation = job.user_id, job.generation
        record = self.repository.find(user_id)
        if record is None or record.generation != generation:
            log.info("carrier %s/%d superseded; skipping", user_id, generation)
            self.metrics.jobs.labels("skipped").inc()
            return
        if record.state == READY:  # redelivered after success: announce again, idempotent
            self._announce(record)
            return
        if record.state == REVOKED:
            return
        record.state = TRAINING
        self.repository.put(record)
        started = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            options = job.options
            public = load_public_model(options.public_model or self.settings.public_model)
            seed = int(options.seed) + generation
            test: Dataset | None = None
            validation_samples = 0
            if options.task_data.sha256:
                custom = self.task_data(options)
                task, validation_samples = custom.dataset, custom.validation_samples
            else:
                task = load_named(options.task or self.settings.task, "train")
                test = load_named(options.task or self.settings.task, "test").subset(2000, seed)
            data = task.subset(min(self.settings.train_samples, len(task)), seed=seed)
            natural = natural_image_for_user(user_id, generation, public.input_shape)
            config = carrier_config(
                self.settings,
                seed,
                options.hidden,
                options.steps,
                options.gamma,
                min(validation_samples, len(data) - 1) if validation_samples else 0,
            )
            result = train_carrier(config, public, data, natural, progress, test_data=test)
        except (InvalidInput, RuntimeError, ValueError, MemoryError) as err:
            # bad options or data: a retry would fail the same way
            self._fail(user_id, generation, str(err)[:2000])
            return
        finally:
            self.metrics.in_flight.dec()
        self.training_seconds.observe(time.perf_counter() - started)
        manifest = {
            **result.manifest(),
            "user_id": user_id,
            "generation": generation,
            "public_model_sha256": public.weights_sha256,
            # what a device feeds its carrier: the task and the shape of one input
            "task": options.task or self.settings.task,
            "task_input_shape": list(task.x.shape[1:]),
        }
        profile = result.query_profile.to_dict()
        store = self.runtime.store
        import torch

        buffer = io.BytesIO()
        torch.save(public.module.state_dict(), buffer)
        blobs = {
            "carrier": (
                carrier_to_safetensors(
                    result.carrier, result.placement, public, generation, result.output_key
                ),
                "application/vnd.modelguard.carrier",
            ),
            "carrier_png": (tensor_png(result.carrier.numpy(), scale=4), "image/png"),
            "mapper": (mapper_to_safetensors(result.mapper), "application/vnd.modelguard.mapper"),
            "manifest": (json.dumps(manifest, default=float).encode(), "application/json"),
            "public_model": (buffer.getvalue(), "application/vnd.modelguard.torch-state-dict"),
            "profile": (json.dumps(profile, default=_jsonable).encode(), "application/json"),
        }
        artifacts, signatures = {}, {}
        for name, (payload, media_type) in blobs.items():
            ref = store.put_blob(payload, media_type)
            artifacts[name] = ref_dict(ref)
            signatures[name] = self.runtime.signer.sign(ref.sha256, name)
        with self._locks[user_id]:
            record = self.repository.find(user_id)
            if record is None or record.generation != generation or record.state == REVOKED:
                return  # rotated or revoked while training: never announce a stale carrier
            record.state = READY
            record.artifacts, record.signatures = artifacts, signatures
            record.manifest = manifest
            self.repository.put(record)
        self.accuracy.set(result.validation_accuracy)
        self.metrics.jobs.labels("succeeded").inc()
        self._announce(record)

    def _announce(self, record: CarrierRecord) -> None:
        refs = {
            name: ref_to_proto(ref_from_dict(ref))
            for name, ref in record.artifacts.items()
            if name != "profile"
        }
        publish_proto(
            self.runtime.bus,
            CARRIER_READY,
            jobs_pb2.CarrierReady(
                user_id=record.user_id,
                generation=record.generation,
                credential_hash=record.credential_hash,
                **refs,
            ),
            key=record.user_id,
            job_type=JOB_CARRIER,
        )

    def _fail(self, user_id: str, generation: int, reason: str) -> None:
        log.warning("carrier %s/%d failed: %s", user_id, generation, reason)
        self.metrics.jobs.labels("failed").inc()
        with self._locks[user_id]:
            record = self.repository.find(user_id)
            if record is not None and record.generation == generation:
                record.state, record.error = FAILED, reason
                self.repository.put(record)


def _tenant_marker(sha256: str, tenant: str) -> str:
    return f"{TASK_DATA_TENANTS_PREFIX}{sha256}/{tenant}"


def _jsonable(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)
    if tolist is not None:
        return tolist()
    return float(value)


__all__ = ["QUEUED", "CarrierService"]
