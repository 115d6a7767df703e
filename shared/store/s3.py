"""`S3Store`: the artifact store in an S3 bucket via the MinIO SDK (MinIO, SeaweedFS,
JuiceFS gateway).

Same layout as `LocalStore`: blobs at ``<blob_key>``, documents under ``docs/``. A blob's
digest is its key and is re-checked on every read. Without encryption nothing relies on
S3 user metadata (the JuiceFS gateway drops it); with a cipher (see
`modelguard.store.encryption`) each object's envelope is its user metadata, so the
server must keep it (MinIO, SeaweedFS and AWS do; an object whose envelope was dropped is
refused with an error saying so). The HTTP client has short timeouts and one retry, so an
unreachable server gives `Unavailable` within seconds instead of minio's default minutes.

Credentials are static keys, or (`aws_credential_chain`) found as the AWS SDKs find them:
environment, shared credentials file, web identity (EKS IRSA), ECS task role, EC2
instance profile; temporary ones are renewed by minio before they expire.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import TypeVar

import urllib3
from minio import Minio
from minio.commonconfig import REPLACE, CopySource
from minio.credentials.credentials import Credentials
from minio.credentials.providers import (
    AWSConfigProvider,
    ChainedProvider,
    EnvAWSProvider,
    IamAwsProvider,
    Provider,
)
from minio.error import MinioException, S3Error

from modelguard.errors import IntegrityError, InvalidInput, NotFound, Unavailable
from modelguard.store.base import ArtifactRef, blob_key, digest
from modelguard.store.encryption import (
    TAG_BYTES,
    Envelope,
    EnvelopeCipher,
    RewrapReport,
    check_plaintext,
)
from modelguard.store.local import (
    DOCS_DIR,
    check_doc_key,
    check_doc_prefix,
    check_sha256,
    ref_digest,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchObject", "ResourceNotFound"})
_AUTH = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"})
_USER_METADATA = "x-amz-meta-"


def user_metadata(headers: Mapping[str, str]) -> dict[str, str]:
    """An object's user metadata from its response headers, names lowercased."""
    return {
        name.lower()[len(_USER_METADATA) :]: value
        for name, value in headers.items()
        if name.lower().startswith(_USER_METADATA)
    }


def http_client(
    connect_timeout_s: float, read_timeout_s: float, secure: bool, retries: int = 1
) -> urllib3.PoolManager:
    """A pool with bounded timeouts and few quick retries (minio's default retries five
    times with long timeouts, i.e. minutes against a dead server)."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
        retries=urllib3.Retry(
            total=retries, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)
        ),
        maxsize=10,
        cert_reqs="CERT_REQUIRED" if secure else "CERT_NONE",  # system CA store
    )


class AwsCredentialChain(ChainedProvider):
    """The AWS SDKs' credential chain, failing with `Unavailable` (the jobs wait) and a
    message naming what was looked for, instead of minio's bare ValueError."""

    def retrieve(self) -> Credentials:
        try:
            return super().retrieve()
        except ValueError as err:
            raise Unavailable(
                "no S3 credentials found in the AWS chain (MODELGUARD_S3_CREDENTIALS="
                "aws-chain): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a shared "
                "credentials file, AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN (EKS IRSA "
                f"sets them), or run with an ECS task role or EC2 instance profile ({err})"
            ) from err


def aws_credential_chain(endpoint: str | None = None) -> AwsCredentialChain:
    """Environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_SESSION_TOKEN``), then the shared credentials file (``AWS_SHARED_CREDENTIALS_FILE``,
    ``AWS_PROFILE``), then web identity (``AWS_WEB_IDENTITY_TOKEN_FILE``, ``AWS_ROLE_ARN``,
    ``AWS_REGION``: STS ``AssumeRoleWithWebIdentity``), the ECS task role
    (``AWS_CONTAINER_CREDENTIALS_*_URI``) and the EC2 instance metadata service, in that
    order. ``endpoint`` replaces AWS's STS and metadata endpoints (a private endpoint)."""
    # bounded timeouts: off AWS the metadata address does not answer at all
    metadata_client = http_client(connect_timeout_s=2.0, read_timeout_s=5.0, secure=True)
    return AwsCredentialChain(
        [
            EnvAWSProvider(),
            AWSConfigProvider(),
            IamAwsProvider(custom_endpoint=endpoint, http_client=metadata_client),
        ]
    )


class S3Store:
    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = False,
        region: str = "us-east-1",
        *,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 30.0,
        cipher: EnvelopeCipher | None = None,
        credentials: Provider | None = None,
    ) -> None:
        """``credentials`` given (e.g. `aws_credential_chain`): the keys are not used."""
        self.endpoint = endpoint
        self.bucket = bucket
        self.cipher = cipher
        # region given: minio skips the GetBucketLocation round trip
        self.client = Minio(
            endpoint,
            access_key=None if credentials else access_key,
            secret_key=None if credentials else secret_key,
            credentials=credentials,
            secure=secure,
            region=region,
            http_client=http_client(connect_timeout_s, read_timeout_s, secure),
        )
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    # -- blobs ------------------------------------------------------------------------------

    def put_blob(self, data: bytes, media_type: str = "application/octet-stream") -> ArtifactRef:
        sha = digest(data)
        ref = ArtifactRef(sha256=sha, key=blob_key(sha), size=len(data), media_type=media_type)
        stat = self._stat(ref.key)
        if stat is not None and stat == self._expected(len(data)):
            return ref  # content-addressed: already stored (verified on every read)
        self._put(ref.key, data, media_type)
        return ref

    def get_blob(self, ref: ArtifactRef | str) -> bytes:
        sha = ref_digest(ref)
        key = blob_key(sha)
        data = self._get(key, what=f"artifact {key}")
        if digest(data) != sha:
            raise IntegrityError(
                f"artifact {key} in bucket {self.bucket} is corrupted: its bytes no longer "
                "match the digest; it will not be used (re-upload the original)"
            )
        return data

    def has_blob(self, sha256_hex: str) -> bool:
        return self._stat(blob_key(check_sha256(sha256_hex))) is not None

    # -- documents --------------------------------------------------------------------------

    def put_doc(self, key: str, data: bytes) -> None:
        """An S3 PUT replaces the object atomically."""
        self._put(self._doc_name(key), data, "application/octet-stream")

    def get_doc(self, key: str) -> bytes:
        return self._get(self._doc_name(key), what=f"document {key!r}")

    def list_docs(self, prefix: str) -> list[str]:
        check_doc_prefix(prefix)
        base = DOCS_DIR + "/"

        def run() -> list[str]:
            objects = self.client.list_objects(self.bucket, prefix=base + prefix, recursive=True)
            return sorted(
                str(o.object_name)[len(base) :]
                for o in objects
                if o.object_name is not None and not o.is_dir
            )

        return self._call(run, f"list documents under {prefix!r}")

    def delete_doc(self, key: str) -> None:
        """Deleting an absent document is not an error (S3 semantics)."""
        name = self._doc_name(key)
        self._call(lambda: self.client.remove_object(self.bucket, name), f"delete {key!r}")

    def ping(self) -> None:
        self._ensure_bucket(force=True)

    # -- encryption ---------------------------------------------------------------------------

    def rewrap_keys(self, encrypt_plaintext: bool = False) -> RewrapReport:
        """Re-wrap every object's data key under its tenant's active key: a server-side
        copy onto itself that replaces the metadata only (the ciphertext is not sent), on
        condition that the object is still the one read (its ETag).
        ``encrypt_plaintext``: objects written before encryption was on are read and
        written back encrypted (with the platform's key; run it while no service writes)."""
        cipher = self.cipher
        if cipher is None:
            raise InvalidInput("rewrapping keys needs encryption on (a keyring)")
        report = RewrapReport()
        names = self._call(
            lambda: [
                str(o.object_name)
                for o in self.client.list_objects(self.bucket, recursive=True)
                if o.object_name is not None and not o.is_dir
            ],
            "list objects",
        )
        for name in names:
            try:
                stat = self._call(
                    partial(self.client.stat_object, self.bucket, name), f"stat {name}"
                )
                envelope = Envelope.from_metadata(user_metadata(stat.metadata or {}), name)
                if envelope is None and encrypt_plaintext:
                    plaintext = self._read(name, f"read {name}")[0]
                    check_plaintext(name, plaintext)
                    self._put(name, plaintext, stat.content_type or "application/octet-stream")
                    report.encrypted += 1
                    continue
                if envelope is None:
                    report.plaintext += 1
                    continue
                rewrapped = cipher.rewrap(name, envelope)
                if rewrapped is None:
                    report.current += 1
                    continue
                if not self._replace_metadata(name, str(stat.etag), stat.content_type, rewrapped):
                    report.changed += 1
                    continue
                report.rewrapped += 1
            except NotFound:
                report.changed += 1  # deleted meanwhile
            except IntegrityError as err:
                report.failed[name] = str(err)
        return report

    def _replace_metadata(
        self, name: str, etag: str, content_type: str | None, envelope: Envelope
    ) -> bool:
        """False when the object changed since it was read (a newer write; it already has
        an envelope of the active key)."""
        metadata: dict[str, str | list[str] | tuple[str]] = {
            "Content-Type": content_type or "application/octet-stream",
            **{_USER_METADATA + k: v for k, v in envelope.to_metadata().items()},
        }
        source = CopySource(self.bucket, name, match_etag=etag)
        try:
            self._call(
                lambda: self.client.copy_object(
                    self.bucket, name, source, metadata=metadata, metadata_directive=REPLACE
                ),
                f"rewrap {name}",
            )
        except Unavailable as err:
            if isinstance(err.__cause__, S3Error) and err.__cause__.code == "PreconditionFailed":
                return False
            raise
        return True

    def _expected(self, size: int) -> tuple[int, bool]:
        """What `_stat` reports of an intact object holding ``size`` plaintext bytes."""
        return (size + TAG_BYTES, True) if self.cipher is not None else (size, False)

    # -- internals ----------------------------------------------------------------------------

    @staticmethod
    def _doc_name(key: str) -> str:
        return f"{DOCS_DIR}/{check_doc_key(key)}"

    def _ensure_bucket(self, force: bool = False) -> None:
        if self._bucket_ready and not force:
            return
        with self._bucket_lock:
            if self._bucket_ready and not force:
                return
            with self._errors(f"reach bucket {self.bucket}"):
                if not self.client.bucket_exists(self.bucket):
                    try:
                        self.client.make_bucket(self.bucket)
                        log.info("created bucket %s on %s", self.bucket, self.endpoint)
                    except S3Error as err:
                        if err.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                            raise
            self._bucket_ready = True

    def _call(self, fn: Callable[[], T], what: str) -> T:
        self._ensure_bucket()
        with self._errors(what):
            return fn()

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Map SDK and transport failures to the project's errors."""
        try:
            yield
        except S3Error as err:
            if err.code in _NOT_FOUND:
                raise NotFound(f"cannot {what}: not found in bucket {self.bucket}") from None
            if err.code in _AUTH:
                raise Unavailable(
                    f"cannot {what}: S3 at {self.endpoint} refused the credentials "
                    f"({err.code}); check the access and secret keys"
                ) from err
            raise Unavailable(f"cannot {what}: S3 error {err.code}: {err.message}") from err
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as err:
            raise Unavailable(
                f"cannot {what}: S3 at {self.endpoint} unreachable ({type(err).__name__}: {err})"
            ) from err

    def _stat(self, name: str) -> tuple[int, bool] | None:
        """The stored size and whether the object has an encryption envelope; None when
        absent."""
        try:
            stat = self._call(lambda: self.client.stat_object(self.bucket, name), f"stat {name}")
        except NotFound:
            return None
        try:
            sealed = Envelope.from_metadata(user_metadata(stat.metadata or {}), name) is not None
        except IntegrityError:
            sealed = False  # a damaged envelope: rewritten by the next put
        return int(stat.size or 0), sealed

    def _put(self, name: str, data: bytes, content_type: str) -> None:
        metadata: dict[str, str | list[str] | tuple[str]] | None = None
        if self.cipher is not None:
            data, envelope = self.cipher.seal(name, data)
            metadata = {_USER_METADATA + k: v for k, v in envelope.to_metadata().items()}
        self._call(
            lambda: self.client.put_object(
                self.bucket,
                name,
                io.BytesIO(data),
                len(data),
                content_type=content_type,
                metadata=metadata,
            ),
            f"write {name}",
        )

    def _read(self, name: str, what: str) -> tuple[bytes, dict[str, str]]:
        """The stored bytes and the user metadata."""

        def run() -> tuple[bytes, dict[str, str]]:
            response = self.client.get_object(self.bucket, name)
            try:
                return bytes(response.read()), user_metadata(response.headers)
            finally:
                response.close()
                response.release_conn()

        return self._call(run, what)

    def _get(self, name: str, what: str) -> bytes:
        """The object's plaintext (decrypted and authenticated with a cipher)."""

        try:
            stored, metadata = self._read(name, f"read {what}")
        except NotFound:
            raise NotFound(f"{what} not found in bucket {self.bucket}") from None
        if self.cipher is None:
            return stored
        return self.cipher.open(name, stored, Envelope.from_metadata(metadata, name))
