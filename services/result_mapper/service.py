"""result-mapper, transport-neutral: the user's mapper registry fed by carrier events,
with extraction detection that revokes a carrier at once (an addition to the reference scheme)."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any

from modelguard.carrier.mapper_registry import MapperRegistry, MapResult
from modelguard.carrier.records import READY, CarrierRecord, CarrierRepository
from modelguard.config import ResultMapperSettings
from modelguard.convert import parse_message, ref_from_proto
from modelguard.errors import IntegrityError, InvalidInput, NotFound, Unavailable
from modelguard.metrics import LATENCY_BUCKETS, ServiceMetrics
from modelguard.proto.modelguard.v1 import jobs_pb2
from modelguard.ratelimit import LimitsConfig, UserLimits
from modelguard.runtime import Runtime
from modelguard.stage import publish_proto
from modelguard.topics import CARRIER_READY, CARRIER_REVOKED, JOB_CARRIER

log = logging.getLogger(__name__)

#: How long an unknown user is remembered before the store is asked again.
MISS_TTL_S = 5.0
MAX_REMEMBERED_MISSES = 10_000


def _valid_user(user_id: str) -> bool:
    from modelguard.carrier.records import check_user_id

    try:
        check_user_id(user_id)
    except InvalidInput:
        return False
    return True


class ResultMapperService:
    def __init__(
        self, runtime: Runtime, settings: ResultMapperSettings, metrics: ServiceMetrics
    ) -> None:
        from modelguard.carrier import kernels
        from modelguard.carrier.extraction import Alarm, DetectorConfig, ExtractionDetector
        from modelguard.carrier.query_profile import QueryProfile

        kernels.warm_up()  # compiled (or loaded from cache) before the first request
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics
        self.carriers = CarrierRepository(runtime.store)
        self._profiles: dict[tuple[str, int], QueryProfile] = {}
        #: the same profiles by content (sha256); an entry lives while a user holds it
        self._profiles_by_digest: weakref.WeakValueDictionary[str, QueryProfile] = (
            weakref.WeakValueDictionary()
        )
        self._profiles_lock = threading.Lock()
        self._misses: dict[str, float] = {}

        def on_alarm(alarm: Alarm) -> None:
            self.alarms.labels(alarm.reason).inc()
            if settings.auto_revoke:
                log.warning("revoking %s/%d: %s", alarm.user_id, alarm.generation, alarm.detail)
                self.registry.revoke(alarm.user_id, alarm.generation)
                publish_proto(
                    runtime.bus,
                    CARRIER_REVOKED,
                    jobs_pb2.CarrierRevoked(
                        user_id=alarm.user_id,
                        generation=alarm.generation,
                        reason=f"suspected extraction ({alarm.reason}: {alarm.detail})",
                    ),
                    key=alarm.user_id,
                    job_type=JOB_CARRIER,
                )

        self.detector = ExtractionDetector(
            DetectorConfig(
                max_rows_per_window=settings.max_rows_per_window,
                max_rows_per_generation=settings.max_rows_per_generation,
            ),
            profiles=lambda user, generation: self._profiles.get((user, generation)),
            on_alarm=on_alarm,
        )
        self.limits = UserLimits(
            LimitsConfig(
                rate_per_second=settings.rate_per_second,
                burst=settings.rate_burst,
                budget_rows=settings.query_budget_rows,
                budget_period_s=settings.query_budget_period_seconds,
            )
        )
        self.registry = MapperRegistry(
            max_loaded_bytes=settings.max_loaded_bytes, loader=self._reload, observer=self.detector
        )
        self.alarms = metrics.counter(
            "extraction_alarms_total", "Suspected model-extraction alarms.", ("reason",)
        )
        # updated on every Map: local families, read at scrape time (modelguard.metrics)
        self.rows = metrics.local_counter("mapped_rows_total", "Pseudo-outputs mapped.")
        self.refusals = metrics.local_counter("refusals_total", "Map calls refused.", ("code",))
        self.map_seconds = metrics.local_histogram(
            "map_seconds", "Map latency inside the server.", LATENCY_BUCKETS
        )
        self.loaded = metrics.gauge("loaded_mappers", "Mappers in memory.")
        # bound once: the serving path calls them on every request
        self._admit = self.limits.admit
        self._map_seconds = self.map_seconds.observe
        self._mapped_rows = self.rows.inc
        self.events = metrics.counter("carrier_events_total", "Carrier events applied.", ("kind",))

    def _mapper_bytes(self, user_id: str, generation: int) -> bytes:
        record = self.carriers.get(user_id)
        if record.generation != generation or "mapper" not in record.artifacts:
            raise NotFound(f"no mapper for {user_id!r} generation {generation}")
        ref = record.artifacts["mapper"]
        data = self.runtime.store.get_blob(str(ref["sha256"]))
        self.runtime.signer.verify(
            str(ref["sha256"]), record.signatures.get("mapper", ""), "mapper"
        )
        return data

    def _reload(self, user_id: str, generation: int) -> bytes:
        try:
            return self._mapper_bytes(user_id, generation)
        except NotFound as err:
            raise Unavailable(str(err)) from err

    # --- carrier events --------------------------------------------------------------------
    def on_event(self, topic: str, value: bytes) -> None:
        if topic == CARRIER_REVOKED:
            event = parse_message(value, jobs_pb2.CarrierRevoked)
            self.registry.revoke(event.user_id, event.generation)
            self.events.labels("revoked").inc()
        else:
            ready = parse_message(value, jobs_pb2.CarrierReady)
            mapper = self.runtime.store.get_blob(ref_from_proto(ready.mapper, "mapper"))
            signature = self._signature(ready.user_id, "mapper")
            self.runtime.signer.verify(ready.mapper.sha256, signature, "mapper")
            self._load_profile(ready)  # first: a mapper is never served unscored
            if self.registry.hot_load(
                ready.user_id, ready.generation, mapper, ready.credential_hash
            ):
                self.events.labels("loaded").inc()
        self.loaded.set(self.registry.status().loaded_mappers)

    def _signature(self, user_id: str, name: str) -> str:
        try:
            return self.carriers.get(user_id).signatures.get(name, "")
        except NotFound:
            return ""

    def _load_profile(self, ready: jobs_pb2.CarrierReady) -> None:
        """What legitimate queries of this carrier look like (kept server-side)."""
        if not self.settings.profile_scoring:
            return
        record = self.carriers.find(ready.user_id)
        if record is None or record.generation != ready.generation:
            raise IntegrityError(
                f"profile of {ready.user_id!r} generation {ready.generation}: no carrier "
                "record of that generation vouches for it; refused"
            )
        self._load_profile_of(record)

    def _load_profile_of(self, record: CarrierRecord) -> None:
        """Keep the carrier's query profile for the extraction detector. A profile that
        is missing or not signed by this deployment is refused: swapped for a lenient one,
        it would silently switch the detector off (unless profile scoring is off)."""
        import json

        from modelguard.carrier.serving_profile import ServingProfile

        if not self.settings.profile_scoring:
            return
        ref = record.artifacts.get("profile")
        if ref is None:
            raise IntegrityError(
                f"the carrier of {record.user_id!r} (generation {record.generation}) has no "
                "query profile, so its Map requests cannot be scored for extraction; refused "
                "(MODELGUARD_RESULT_MAPPER_PROFILE_SCORING=false serves carriers without one)"
            )
        digest = str(ref["sha256"])
        # verified before parsing, and for every record: a shared copy is only reused
        # once this record's own signature vouches for the digest
        self.runtime.signer.verify(digest, record.signatures.get("profile", ""), "profile")
        # Users of one pooled carrier share its profile (as they share its mapper): one
        # copy in memory and in the CPU caches, parsed once.
        shared = self._profiles_by_digest.get(digest)
        if shared is None:
            data: dict[str, Any] = json.loads(self.runtime.store.get_blob(digest))
            shared = ServingProfile.from_dict(data)
        with self._profiles_lock:
            self._profiles_by_digest[digest] = shared
            self._profiles[(record.user_id, record.generation)] = shared

    def _warm(self, user_id: str) -> None:
        """Load a ready carrier's mapper straight from the store when no event brought it
        (a replica started after the event, or embedded mode in a new process). Misses are
        remembered briefly so unknown users cannot make every call read the store."""
        now = time.monotonic()
        if now - self._misses.get(user_id, -MISS_TTL_S) < MISS_TTL_S:
            return
        if not _valid_user(user_id):
            return  # refused by the registry with a clear error; nothing to remember
        record = self.carriers.find(user_id)
        if record is None or record.state != READY or "mapper" not in record.artifacts:
            if len(self._misses) >= MAX_REMEMBERED_MISSES:
                self._misses.clear()  # bounded memory; the cost is one store read each
            self._misses[user_id] = now
            return
        mapper = self._mapper_bytes(user_id, record.generation)
        self._load_profile_of(record)  # first: a mapper is never served unscored
        self.registry.hot_load(user_id, record.generation, mapper, record.credential_hash)
        self.events.labels("warmed").inc()

    # --- serving --------------------------------------------------------------------------
    def generation(self, user_id: str) -> int | None:
        """The carrier generation served for ``user_id`` (a ready carrier is loaded first),
        or None when there is none."""
        if self.registry.generation(user_id) is None:
            self._warm(user_id)
        return self.registry.generation(user_id)

    def map(self, user_id: str, credential: str, pseudo: bytes, rows: int) -> MapResult:
        if self.registry.generation(user_id) is None:
            self._warm(user_id)
        started = time.perf_counter()  # (Histogram.time() builds a timer object per call)
        try:
            result = self.registry.map(user_id, credential, pseudo, rows, self._admit)
        finally:
            self._map_seconds(time.perf_counter() - started)
        self._mapped_rows(len(result.labels))
        return result


def is_carrier_topic(topic: str) -> bool:
    return topic in (CARRIER_READY, CARRIER_REVOKED)
