"""S3-compatible object store: AWS S3, MinIO, Cloudflare R2, Google Cloud Storage's XML API.

Confinement: every key is checked by `validate_key` before it is joined to the prefix, and listings
ask only for `prefix/`, so this store never names an object outside `bucket/prefix`.

Deletes go out as `DeleteObjects` requests of up to 1000 keys (or, with `delete_mode="single"`, as
concurrent `DeleteObject` calls for endpoints without multi-object delete). The per-key `Errors` of
every answer are read: `NoSuchKey` counts as deleted, throttling (`SlowDown`, 503) is backed off and
retried here a few times, and anything else comes back as a failed `DeleteResult` for the sweep to
retry later with its own, longer backoff. No store error escapes `delete_many` as an exception.
"""

from __future__ import annotations

import contextvars
import hashlib
import heapq
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import boto3
import structlog
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from config.errors import BadInput, BlobExists, RetentionError, StoreError
from config.redact import redact_url
from worker.store import MARKER_NAME, BlobDigest, BlobInfo, BlobStore, DeleteResult, DeleteTarget, PartialUpload, chunked
from worker.store.keys import validate_key

log = structlog.get_logger("worker.store.s3")

# S3's own limit for one DeleteObjects request.
MAX_DELETE_KEYS = 1000
# botocore's attempts per request (standard mode: exponential backoff with jitter on connection
# errors, 5xx and throttling). 3 is botocore's default and keeps a dead endpoint from stalling a
# batch for long; the sweep retries what is still failing on its own schedule.
BOTOCORE_MAX_ATTEMPTS = 3
# When botocore has given up on a throttled request, or an answer names keys as SlowDown, we back off
# for longer than botocore does and retry just those keys: 3 rounds of up to 1, 2 and 4 s (half of
# each jittered) spread the load over a few seconds, well inside the claim lease (5 min), before the
# keys are reported failed and the sweep's own backoff (30 s and up) takes over.
THROTTLE_ROUNDS = 3
THROTTLE_BASE_SECONDS = 1.0
THROTTLE_CAP_SECONDS = 8.0
# Per-key error codes that mean "busy, try again": S3 documents InternalError and SlowDown as
# retryable answers inside a DeleteObjects response.
_THROTTLED = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "503"})
_MISSING = frozenset({"NoSuchKey", "NoSuchVersion", "NotFound", "404"})
# How long the bucket's versioning state and Object Lock configuration are trusted once read: a bucket whose
# versioning an operator turns on is handled as versioned within minutes, at two requests per 5 minutes.
BUCKET_FACTS_SECONDS = 300
# A retain-until date this close to (or just behind) our clock still counts as the lock that refused the
# delete: the store's clock decides, and ours may run a little ahead of it.
LOCK_CLOCK_SLACK_SECONDS = 60
# One deletion: an object's full key and the version to delete (None: the key, which on a versioned bucket
# would only add a delete marker, so it is sent only to unversioned buckets).
_Entry = tuple[str, "str | None"]
# A conditional create lost against another writer (412) or a concurrent conditional write (409).
_ALREADY_EXISTS = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
# s3transfer's default: files above 8 MiB go up in 8 MiB parts, so a retry resends at most one part
# and WhatsApp's 100 MB documents upload as ~12 parallel parts.
MULTIPART_BYTES = 8 * 1024 * 1024
# Connecting to a healthy endpoint takes milliseconds; 10 s still rides out a cold load balancer.
# Reads wait up to 60 s because a 1000-key DeleteObjects can take seconds on a busy bucket.
CONNECT_TIMEOUT_SECONDS = 10
READ_TIMEOUT_SECONDS = 60
# Bucket names: AWS allows 3-63 of a-z0-9.- ; GCS allows up to 222 and underscores, R2 similar.
_BUCKET_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")
_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f]")
# SigV4 presigned URLs are valid for at most 7 days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600


def _describe(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        code, _, message = _error_of(exc)
        return f"{code}: {message}" if message else code
    return f"{type(exc).__name__}: {exc}"


def _error_of(exc: ClientError) -> tuple[str, int, str]:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code") or status), status, str(error.get("Message") or "")


class S3Store(BlobStore):
    can_presign = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        delete_threads: int = 8,
        delete_mode: Literal["batch", "single"] = "batch",
        addressing_style: Literal["auto", "path", "virtual"] = "auto",
        throttle_backoff: float = THROTTLE_BASE_SECONDS,
        throttle_rounds: int = THROTTLE_ROUNDS,
        multipart_bytes: int = MULTIPART_BYTES,
    ):
        if not 3 <= len(bucket) <= 222 or not set(bucket) <= _BUCKET_CHARS or bucket[0] in ".-_" or bucket[-1] in ".-_":
            raise BadInput(f"invalid bucket name {bucket!r}: use 3-222 letters, digits, '.', '-' or '_'.")
        prefix = prefix.strip("/")
        if prefix:
            try:
                validate_key(prefix)
            except BadInput as exc:
                raise BadInput(f"invalid prefix in storage URL: {exc}") from None
        if delete_mode not in ("batch", "single"):
            raise BadInput(f"invalid S3 delete mode {delete_mode!r}: use 'batch' or 'single'.")
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.endpoint_url = endpoint_url
        self.delete_mode = delete_mode
        self._threads = delete_threads
        self._throttle_backoff = throttle_backoff
        self._throttle_rounds = throttle_rounds
        config = Config(
            retries={"mode": "standard", "total_max_attempts": BOTOCORE_MAX_ATTEMPTS},
            # One connection per delete or upload thread, so no thread waits for a socket.
            max_pool_connections=delete_threads,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            read_timeout=READ_TIMEOUT_SECONDS,
            s3={"addressing_style": addressing_style},
            # SigV4 everywhere: boto3 would presign with legacy SigV2 in us-east-1, which newer regions
            # and most S3-compatible endpoints refuse.
            signature_version="s3v4",
            # Checksums only where S3 requires them (DeleteObjects): several S3-compatible endpoints
            # reject the trailing checksums botocore would otherwise add to every upload.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A session of our own: boto3's default session is not safe to share between threads.
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)
        # Every write this client makes is create-only, so no upload can replace an existing blob.
        for operation in ("PutObject", "CompleteMultipartUpload"):
            self.client.meta.events.register(f"before-parameter-build.s3.{operation}", _create_only)
        self._transfer_config = TransferConfig(
            multipart_threshold=multipart_bytes, multipart_chunksize=multipart_bytes, max_concurrency=delete_threads
        )
        self._transfer = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._facts: tuple[str, bool, timedelta | None] | None = None
        self._facts_at = 0.0

    @classmethod
    def from_url(cls, url: str, *, endpoint_url: str | None = None, delete_threads: int = 8,
                 delete_mode: Literal["batch", "single"] = "batch", addressing_style: Literal["auto", "path", "virtual"] = "auto",
                 **other_backends_options) -> "S3Store":
        """`s3://bucket[/prefix]`; options meant for other backends (the settings pass one set) are ignored."""
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise BadInput(f"invalid storage URL {redact_url(url)!r}: use s3://bucket or s3://bucket/prefix.")
        if parsed.username or parsed.password or parsed.port or parsed.query or parsed.fragment:
            raise BadInput(f"invalid storage URL {redact_url(url)!r}: give only s3://bucket/prefix; credentials go where boto3 looks for them.")
        return cls(parsed.netloc, parsed.path, endpoint_url=endpoint_url, delete_threads=delete_threads,
                   delete_mode=delete_mode, addressing_style=addressing_style)

    def _object_key(self, key: str) -> str:
        """The object's full key, only ever built from a validated key."""
        validate_key(key)
        # XML 1.0 cannot carry control characters: one such key would turn a whole DeleteObjects
        # request into MalformedXML and fail the other 999 keys with it.
        if _CONTROL_CHARS.search(key):
            raise BadInput(f"invalid storage key {key!r}: control characters cannot be sent to an S3 store.")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="s3-delete")
            return self._pool

    # -- reads and writes ----------------------------------------------------------------------

    def stat(self, key: str) -> BlobInfo | None:
        full = self._object_key(key)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=full)
        except ClientError as exc:
            code, status, message = _error_of(exc)
            if status == 404 or code in _MISSING:
                return None
            raise StoreError(f"cannot read {key!r} in {self.url}: {code} {message}".strip() + ".") from None
        except BotoCoreError as exc:
            raise StoreError(f"cannot reach {self.url}: {exc}") from None
        return BlobInfo(key=key, size=int(head["ContentLength"]), modified=head.get("LastModified"),
                        version=head.get("VersionId"))

    def stat_many(self, keys: Sequence[str]) -> list[BlobInfo | None | RetentionError]:
        """A HEAD per key, `delete_threads` at a time: each is a round trip, so they overlap."""
        return list(self._executor().map(lambda key: super(S3Store, self).stat_many([key])[0], keys))

    def put_file(self, key: str, source: Path) -> int:
        return self.put_blob(key, source).size

    def put_blob(self, key: str, source: Path) -> BlobInfo:
        full = self._object_key(key)
        # Asking first gives a clear error on endpoints that ignore conditional writes; the
        # If-None-Match on the upload itself closes the race with a concurrent writer.
        if self.stat(key) is not None:
            raise BlobExists(f"a blob already exists at storage key {key!r}; refusing to overwrite it.")
        with self._lock:
            if self._transfer is None:
                self._transfer = create_transfer_manager(self.client, self._transfer_config)
            transfer = self._transfer
        # A bucket with Object Lock accepts an upload only with a checksum of its body (S3 asks for Content-MD5
        # or a flexible checksum), which this client otherwise sends only where every endpoint requires it.
        extra = {"ChecksumAlgorithm": "CRC32"} if self.object_lock() else None
        try:
            transfer.upload(str(source), self.bucket, full, extra_args=extra).result()
        except ClientError as exc:
            code, status, message = _error_of(exc)
            if code in _ALREADY_EXISTS or status in (409, 412):
                raise BlobExists(f"a blob already exists at storage key {key!r}; refusing to overwrite it.") from None
            raise StoreError(f"cannot upload {key!r} to {self.url}: {code} {message}".strip() + ".") from None
        except BotoCoreError as exc:
            raise StoreError(f"cannot upload {key!r} to {self.url}: {exc}") from None
        except OSError as exc:
            raise BadInput(f"cannot read {str(source)!r}: {exc.strerror or exc}.") from None
        # The size the store holds, not the file's size now: the file may have changed meanwhile.
        info = self.stat(key)
        if info is None:
            raise StoreError(f"upload of {key!r} to {self.url} finished but the object is not there.")
        log.debug("store.s3.uploaded", key=key, size=info.size, version=info.version)
        return info

    def read_marker(self) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._object_key(MARKER_NAME))["Body"].read(64 * 1024)
        except ClientError as exc:
            code, status, message = _error_of(exc)
            if status == 404 or code in _MISSING:
                return None
            raise StoreError(f"cannot read the binding marker of {self.url}: {code} {message}".strip() + ".") from None
        except BotoCoreError as exc:
            raise StoreError(f"cannot reach {self.url}: {exc}") from None

    def write_marker(self, content: bytes) -> bool:
        """A create-only PUT (If-None-Match, added to every PutObject of this client): never over another marker."""
        try:
            # With Object Lock, S3 takes an upload only with a checksum of its body (see put_blob).
            checksum = {"ChecksumAlgorithm": "CRC32"} if self.object_lock() else {}
            self.client.put_object(Bucket=self.bucket, Key=self._object_key(MARKER_NAME), Body=content,
                                   ContentType="application/json", **checksum)
        except ClientError as exc:
            code, status, message = _error_of(exc)
            if code in _ALREADY_EXISTS or status in (409, 412):
                return False
            raise StoreError(f"cannot write the binding marker of {self.url}: {code} {message}".strip() + ".") from None
        except BotoCoreError as exc:
            raise StoreError(f"cannot reach {self.url}: {exc}") from None
        # An endpoint that ignores If-None-Match would have replaced a marker: what is there now decides.
        return self.read_marker() == content

    def presigned_url(self, key: str, expires_in: int) -> str:
        if not 1 <= expires_in <= MAX_PRESIGN_SECONDS:
            raise BadInput(f"a presigned URL must be valid for 1 s to 7 days, not {expires_in} s.")
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._object_key(key)}, ExpiresIn=int(expires_in)
        )

    def iter_keys(self, *, ordered: bool = False, partial_uploads: bool = False) -> Iterator[BlobInfo | PartialUpload]:
        # ListObjectsV2 returns keys in UTF-8 byte order, so every listing is `ordered`. On a versioned bucket the
        # listing is of versions (ListObjectVersions, the same order and page size), so a key whose bytes survive
        # only as noncurrent versions, or only delete markers, is listed too: reconcile and verify see it.
        # The trailing slash keeps `media-old/...` out of a listing of prefix `media`.
        listed = f"{self.prefix}/" if self.prefix else ""
        skipped = 0
        try:
            entries = self._list_current(listed) if self.versioning() == "off" else self._list_versions_under(listed)
            for entry in entries:
                name = entry["Key"]
                if not name.startswith(listed):
                    continue
                relative = name[len(listed):]
                if relative == MARKER_NAME:
                    continue  # the binding marker: not a blob
                try:
                    self._object_key(relative)
                except BadInput:
                    # e.g. `dir/` markers or `a//b`: no item can have this key, and we could not
                    # address it safely, so reconciliation never sees it.
                    skipped += 1
                    continue
                yield BlobInfo(key=relative, size=int(entry["Size"]), modified=entry.get("LastModified"),
                               version=entry.get("VersionId"), current=entry.get("current", True),
                               versions=entry.get("versions", 1), delete_markers=entry.get("delete_markers", 0))
        except ClientError as exc:
            code, _, message = _error_of(exc)
            raise StoreError(f"cannot list {self.url}: {code} {message}".strip() + ".") from None
        except BotoCoreError as exc:
            raise StoreError(f"cannot list {self.url}: {exc}") from None
        if skipped:
            log.warning("store.s3.unaddressable_keys_skipped", store=self.url, count=skipped)
        if partial_uploads:
            yield from self._multipart_uploads(listed)

    def _list_current(self, listed: str) -> Iterator[dict]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=listed, PaginationConfig={"PageSize": MAX_DELETE_KEYS}):
            yield from page.get("Contents", [])

    def _list_versions_under(self, prefix: str) -> Iterator[dict]:
        """One entry per key under `prefix`, in key order, summing up its versions and delete markers: `Size`,
        `LastModified` and `VersionId` of its newest version holding bytes (0 and None when only markers are
        left), `current` (its latest entry is not a delete marker), `versions`, `delete_markers`."""
        pending: dict | None = None
        paginator = self.client.get_paginator("list_object_versions")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": MAX_DELETE_KEYS}):
            markers = [{**marker, "marker": True} for marker in page.get("DeleteMarkers", [])]
            # Each list is in key order, newest first within a key; a key may continue on the next page.
            for entry in heapq.merge(page.get("Versions", []), markers, key=lambda item: item["Key"]):
                if pending is None or pending["Key"] != entry["Key"]:
                    if pending is not None:
                        yield pending
                    pending = {"Key": entry["Key"], "Size": 0, "LastModified": entry.get("LastModified"), "VersionId": None,
                               "current": True, "versions": 0, "delete_markers": 0}
                if entry.get("marker"):
                    pending["delete_markers"] += 1
                    if entry.get("IsLatest"):
                        pending["current"] = False
                    continue
                if pending["versions"] == 0:  # the first version listed is the newest
                    pending.update(Size=int(entry["Size"]), LastModified=entry.get("LastModified"), VersionId=entry["VersionId"])
                pending["versions"] += 1
        if pending is not None:
            yield pending

    def remains(self, key: str) -> BlobInfo | None:
        if self.versioning() == "off":
            return self.stat(key)
        full = self._object_key(key)
        try:
            for entry in self._list_versions_under(full):
                if entry["Key"] == full:
                    return BlobInfo(key=key, size=entry["Size"], modified=entry["LastModified"], version=entry["VersionId"],
                                    current=entry["current"], versions=entry["versions"], delete_markers=entry["delete_markers"])
                if entry["Key"] > full:
                    break
        except ClientError as exc:
            code, _, message = _error_of(exc)
            raise StoreError(f"cannot list the versions of {key!r} in {self.url}: {code} {message}".strip() + ".") from None
        except BotoCoreError as exc:
            raise StoreError(f"cannot reach {self.url}: {exc}") from None
        return None

    def _multipart_uploads(self, listed: str) -> Iterator[PartialUpload]:
        """Multipart uploads started under the prefix and never completed (a killed upload): S3 keeps
        and bills their parts until they are aborted."""
        try:
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=listed):
                for upload in page.get("Uploads", []):
                    name = upload["Key"]
                    if name.startswith(listed):
                        yield PartialUpload(key=name[len(listed):], started=upload.get("Initiated"), upload_id=upload["UploadId"])
        except ClientError as exc:
            code, _, message = _error_of(exc)
            raise StoreError(f"cannot list unfinished uploads in {self.url}: {code} {message}".strip() + ".") from None
        except BotoCoreError as exc:
            raise StoreError(f"cannot list unfinished uploads in {self.url}: {exc}") from None

    def discard_partial_uploads(self, uploads: list[PartialUpload]) -> list[DeleteResult]:
        results = []
        for upload in uploads:
            try:
                if upload.upload_id is None:
                    raise BadInput("not a multipart upload")
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._object_key(upload.key), UploadId=upload.upload_id)
                results.append(DeleteResult(upload.key, ok=True))
            except BadInput as exc:
                results.append(DeleteResult(upload.key, ok=False, error=f"refused: {exc}"))
            except ClientError as exc:
                code, _, message = _error_of(exc)
                if code == "NoSuchUpload":
                    results.append(DeleteResult(upload.key, ok=True, missing=True))
                else:
                    results.append(DeleteResult(upload.key, ok=False, error=f"{code}: {message}" if message else code))
            except BotoCoreError as exc:
                results.append(DeleteResult(upload.key, ok=False, error=f"{type(exc).__name__}: {exc}"))
        return results

    def digest(self, key: str) -> BlobDigest | None:
        full = self._object_key(key)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=full)["Body"]
            hasher, size = hashlib.sha256(), 0
            for chunk in body.iter_chunks(1024 * 1024):
                hasher.update(chunk)
                size += len(chunk)
        except ClientError as exc:
            code, status, message = _error_of(exc)
            if status == 404 or code in _MISSING:
                return None
            raise StoreError(f"cannot read {key!r} in {self.url}: {code} {message}".strip() + ".") from None
        except BotoCoreError as exc:
            raise StoreError(f"cannot read {key!r} in {self.url}: {exc}") from None
        return BlobDigest(size=size, sha256=hasher.hexdigest())

    # -- versioning and Object Lock -------------------------------------------------------------

    def _bucket_facts(self) -> tuple[str, bool, timedelta | None]:
        """The bucket's versioning state, whether Object Lock is on, and its default retention: asked once
        (GetBucketVersioning, GetObjectLockConfiguration) and trusted for BUCKET_FACTS_SECONDS."""
        with self._lock:
            if self._facts is not None and time.monotonic() - self._facts_at < BUCKET_FACTS_SECONDS:
                return self._facts
        versioning = "unknown"
        try:
            versioning = self.client.get_bucket_versioning(Bucket=self.bucket).get("Status") or "off"
        except (ClientError, BotoCoreError) as exc:
            # Unknown is handled as versioned (a key's every version is listed before it is deleted): slower,
            # never half a deletion.
            log.warning("store.s3.versioning_unknown", store=self.url, error=_describe(exc))
        lock, default = False, None
        try:
            config = self.client.get_object_lock_configuration(Bucket=self.bucket).get("ObjectLockConfiguration", {})
            lock = config.get("ObjectLockEnabled") == "Enabled"
            retention = config.get("Rule", {}).get("DefaultRetention", {})
            days = int(retention.get("Days") or 0) + 365 * int(retention.get("Years") or 0)
            default = timedelta(days=days) if lock and days else None
        except ClientError as exc:
            if _error_of(exc)[0] != "ObjectLockConfigurationNotFoundError":
                log.warning("store.s3.object_lock_unknown", store=self.url, error=_describe(exc))
        except BotoCoreError as exc:
            log.warning("store.s3.object_lock_unknown", store=self.url, error=_describe(exc))
        facts = (versioning, lock, default)
        # Cached even when unknown: asking again for every batch would only repeat the warning; the answer is
        # asked again after BUCKET_FACTS_SECONDS like any other.
        with self._lock:
            self._facts, self._facts_at = facts, time.monotonic()
        if versioning != "unknown":
            log.debug("store.s3.bucket_facts", store=self.url, versioning=versioning, object_lock=lock,
                      default_retention_s=int(default.total_seconds()) if default else None)
        return facts

    def versioning(self) -> str:
        return self._bucket_facts()[0]

    def object_lock(self) -> bool:
        return self._bucket_facts()[1]

    def default_retention(self) -> timedelta | None:
        return self._bucket_facts()[2]

    def versions_of(self, key: str) -> list[str]:
        """Every version ID and delete marker of exactly `key` (ListObjectVersions with the key as prefix, so
        `key2` and `key/x` are listed but skipped), newest first."""
        full = self._object_key(key)
        found: list[str] = []
        for page in self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=full):
            names = []
            for entry in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
                names.append(entry["Key"])
                if entry["Key"] == full:
                    found.append(entry["VersionId"])
            if any(name > full for name in names):
                break  # listed in key order: nothing of `key` comes after a greater key
        return found

    def _lock_of(self, full: str, version: str) -> tuple[str, datetime | None] | None:
        """Why a version's delete was refused, when the reason is Object Lock: ('legal_hold', None) or
        ('retention', retain-until). None: not a lock (a plain permission error). A HEAD of the version says
        both in one request (its object-lock headers); where it does not (a caller allowed GetObjectRetention
        but not to see the headers, an endpoint that omits them), GetObjectLegalHold and GetObjectRetention."""
        hold, until = None, None
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=full, VersionId=version)
            hold, until = head.get("ObjectLockLegalHoldStatus"), head.get("ObjectLockRetainUntilDate")
        except (ClientError, BotoCoreError):
            pass
        if hold is None and until is None:
            try:
                hold = self.client.get_object_legal_hold(Bucket=self.bucket, Key=full, VersionId=version).get("LegalHold", {}).get("Status")
            except (ClientError, BotoCoreError):
                pass  # no legal hold configured on the version (or not readable): look at its retention
            if hold != "ON":
                try:
                    until = self.client.get_object_retention(Bucket=self.bucket, Key=full, VersionId=version)["Retention"].get("RetainUntilDate")
                except (ClientError, BotoCoreError, KeyError):
                    pass
        if hold == "ON":
            return "legal_hold", None
        if until is not None and until > datetime.now(timezone.utc) - timedelta(seconds=LOCK_CLOCK_SLACK_SECONDS):
            return "retention", until.astimezone(timezone.utc)
        return None

    # -- deletes -------------------------------------------------------------------------------

    def delete_many(self, keys: list[str]) -> list[DeleteResult]:
        return self.delete_targets([(key, None) for key in keys])

    def delete_targets(self, targets: Sequence[DeleteTarget]) -> list[DeleteResult]:
        """Each target's exact version, or (no version recorded, on a versioned bucket) every version and delete
        marker of its key, listed first; on an unversioned bucket a key is just deleted. All the resulting
        (object, version) entries go out together, 1000 to a DeleteObjects request, so a batch of recorded
        versions costs what a batch of keys did."""
        failed: dict[int, DeleteResult] = {}
        plans: dict[int, list[_Entry]] = {}
        versioned = bool(targets) and self.versioning() != "off"
        to_list: list[tuple[int, str]] = []
        for index, (key, version) in enumerate(targets):
            try:
                full = self._object_key(key)
            except BadInput as exc:
                failed[index] = DeleteResult(key, ok=False, error=f"refused: {exc}")
                continue
            if version is not None or not versioned:
                plans[index] = [(full, version)]
            else:
                to_list.append((index, key))
        for (index, key), listed in zip(to_list, self._map(self._list_versions, [key for _, key in to_list]), strict=True):
            if isinstance(listed, DeleteResult):
                failed[index] = listed
            else:
                plans[index] = [(self._object_key(key), version) for version in listed]
        entries = list(dict.fromkeys(entry for plan in plans.values() for entry in plan))  # each once
        outcome: dict[_Entry, DeleteResult] = {}
        if entries:
            if self.delete_mode == "single":
                work, units = self._delete_one, entries
            else:
                work, units = self._delete_chunk, list(chunked(entries, MAX_DELETE_KEYS))
            for part in self._map(work, units):
                outcome.update(part)
        results = []
        for index, (key, _) in enumerate(targets):
            if index in failed:
                results.append(failed[index])
                continue
            answers = [outcome[entry] for entry in plans[index]]
            if not answers:  # a versioned key with no version at all: already gone
                results.append(DeleteResult(key, ok=True, missing=True))
                continue
            refused = [answer for answer in answers if not answer.ok]
            if refused:
                # A lock says more than another error: the date tells when to come back.
                first = next((answer for answer in refused if answer.lock_reason), refused[0])
                results.append(DeleteResult(key, ok=False, error=first.error, lock_reason=first.lock_reason,
                                            locked_until=first.locked_until))
            else:
                results.append(DeleteResult(key, ok=True, missing=all(answer.missing for answer in answers)))
        return results

    def _map(self, work, units: list) -> list:
        """`work` of each unit, on the store's pool when there is more than one."""
        if len(units) <= 1 or self._threads == 1:
            return [work(unit) for unit in units]
        # A context copy per task keeps the caller's bound log fields on events from the pool.
        pool = self._executor()
        return [future.result() for future in [pool.submit(contextvars.copy_context().run, work, unit) for unit in units]]

    def _list_versions(self, key: str) -> list[str] | DeleteResult:
        try:
            return self.versions_of(key)
        except ClientError as exc:
            code, _, message = _error_of(exc)
            return DeleteResult(key, ok=False, error=f"cannot list the versions of this key: {code}: {message}".rstrip(": "))
        except BotoCoreError as exc:
            return DeleteResult(key, ok=False, error=f"cannot list the versions of this key: {type(exc).__name__}: {exc}")

    def _backoff(self, round_number: int) -> float:
        """Seconds before throttled round `round_number` (1, 2, ...): doubling, half of it jittered."""
        delay = min(self._throttle_backoff * 2 ** (round_number - 1), THROTTLE_CAP_SECONDS)
        return delay / 2 + random.uniform(0, delay / 2)

    def _delete_chunk(self, entries: list[_Entry]) -> dict[_Entry, DeleteResult]:
        """Delete up to 1000 entries with DeleteObjects, retrying throttled ones a few rounds."""
        outcome: dict[_Entry, DeleteResult] = {}
        pending = entries
        for round_number in range(self._throttle_rounds + 1):
            throttled, reason = self._delete_request(pending, outcome)
            if not throttled:
                break
            if round_number == self._throttle_rounds:
                log.warning("store.s3.delete_throttled_gave_up", store=self.url, keys=len(throttled), rounds=round_number, error=reason)
                for entry in throttled:
                    outcome[entry] = DeleteResult(entry[0], ok=False, error=f"{reason} (still throttled after {self._throttle_rounds} retries)")
                break
            delay = self._backoff(round_number + 1)
            log.warning("store.s3.delete_retry", store=self.url, keys=len(throttled), round=round_number + 1, delay_s=round(delay, 3), error=reason)
            time.sleep(delay)
            pending = throttled
        return outcome

    def _delete_request(self, entries: list[_Entry], outcome: dict[_Entry, DeleteResult]) -> tuple[list[_Entry], str | None]:
        """One DeleteObjects request; record final results in `outcome`, return the entries to retry."""
        try:
            answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [
                {"Key": name, "VersionId": version} if version is not None else {"Key": name} for name, version in entries
            ], "Quiet": False})
        except ClientError as exc:
            code, status, message = _error_of(exc)
            error = f"{code}: {message}" if message else code
            if code in _THROTTLED or status == 503:
                return list(entries), error
            self._fail_request(entries, error, outcome)
            return [], None
        except BotoCoreError as exc:
            # A reset or timeout that outlasted botocore's retries: the request as a whole failed.
            self._fail_request(entries, f"{type(exc).__name__}: {exc}", outcome)
            return [], None
        by_name: dict[str, list[_Entry]] = {}
        for entry in entries:
            by_name.setdefault(entry[0], []).append(entry)
        throttled: dict[_Entry, None] = {}  # ordered set
        reason = None
        codes: Counter[str] = Counter()
        for error_entry in answer.get("Errors", []):
            name, code = error_entry.get("Key"), str(error_entry.get("Code") or "UnknownError")
            # S3 names the version of a failed entry; an endpoint that does not fails every entry of the key.
            version = error_entry.get("VersionId")
            for entry in by_name.get(name, []):
                if (version is not None and entry[1] != version) or entry in outcome or entry in throttled:
                    continue
                codes[code] += 1
                if code in _MISSING:
                    outcome[entry] = DeleteResult(name, ok=True, missing=True)
                elif code in _THROTTLED:
                    throttled[entry] = None
                    reason = code
                else:
                    message = error_entry.get("Message")
                    error = f"{code}: {message}" if message else code
                    lock = self._lock_of(name, entry[1]) if code == "AccessDenied" and entry[1] is not None else None
                    outcome[entry] = DeleteResult(name, ok=False, error=error, lock_reason=lock[0] if lock else None,
                                                  locked_until=lock[1] if lock else None)
        deleted = {(item.get("Key"), item.get("VersionId")) for item in answer.get("Deleted", [])}
        for entry in entries:
            if entry in outcome or entry in throttled:
                continue
            if entry in deleted or (entry[0], None) in deleted:
                outcome[entry] = DeleteResult(entry[0], ok=True)
            else:
                # Never take silence for success: only an entry the store confirms is deleted.
                outcome[entry] = DeleteResult(entry[0], ok=False, error="the store's DeleteObjects answer did not mention this key")
        if codes:
            log.warning("store.s3.delete_key_errors", store=self.url, keys=len(entries), codes=dict(codes))
        return list(throttled), reason

    def _fail_request(self, entries: list[_Entry], error: str, outcome: dict[_Entry, DeleteResult]) -> None:
        log.warning("store.s3.delete_request_failed", store=self.url, keys=len(entries), error=error)
        for entry in entries:
            outcome[entry] = DeleteResult(entry[0], ok=False, error=error)

    def _delete_one(self, entry: _Entry) -> dict[_Entry, DeleteResult]:
        """Single-object delete (mode "single"), for endpoints without DeleteObjects."""
        name, version = entry
        options = {"VersionId": version} if version is not None else {}
        for round_number in range(self._throttle_rounds + 1):
            try:
                self.client.delete_object(Bucket=self.bucket, Key=name, **options)
                return {entry: DeleteResult(name, ok=True)}
            except ClientError as exc:
                code, status, message = _error_of(exc)
                error = f"{code}: {message}" if message else code
                if status == 404 or code in _MISSING:
                    return {entry: DeleteResult(name, ok=True, missing=True)}
                if (code in _THROTTLED or status == 503) and round_number < self._throttle_rounds:
                    delay = self._backoff(round_number + 1)
                    log.warning("store.s3.delete_retry", store=self.url, keys=1, round=round_number + 1, delay_s=round(delay, 3), error=error)
                    time.sleep(delay)
                    continue
                lock = self._lock_of(name, version) if code == "AccessDenied" and version is not None else None
                return {entry: DeleteResult(name, ok=False, error=error, lock_reason=lock[0] if lock else None,
                                            locked_until=lock[1] if lock else None)}
            except BotoCoreError as exc:
                return {entry: DeleteResult(name, ok=False, error=f"{type(exc).__name__}: {exc}")}
        raise AssertionError("unreachable: the last round always returns")

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            transfer, self._transfer = self._transfer, None
        if pool is not None:
            pool.shutdown(wait=True)
        if transfer is not None:
            transfer.shutdown()
        self.client.close()


def _create_only(params: dict, **_) -> None:
    """botocore hook: make PutObject/CompleteMultipartUpload fail (412) rather than overwrite."""
    params.setdefault("IfNoneMatch", "*")
