"""S3AdapterStore: the adapter store in an S3 (or S3-compatible) bucket, `s3://bucket/prefix`.

Layout: the local store's, as object keys: `<prefix>/<tenant>/v<version>/{adapter_config.json,
adapter_model.safetensors}`. Client: s3fs (fsspec), endpoint from `adapter_store_endpoint` ("" = AWS);
credentials and region from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_DEFAULT_REGION / AWS_REGION, or AWS_PROFILE), read by botocore's own chain.

Why onboarding stays atomic without a rename (an object store has none): a version is immutable
and the Redis record is the commit point. `install` writes both objects under the version's new key
prefix (refusing one that already holds objects), then reads them back and checks their sha256
against what validation saw; only after that does onboarding write the record, and a failure at any
step deletes what was written. Version numbers come from Redis's counter and are never reused, so
objects left by a crash mid-install sit under a key no record points to and workers never read
them; `tenant_versions` shows them to an audit.

Who calls what: as for `AdapterStore`. `read` runs on the worker's owner thread (s3fs does its I/O on
its own event-loop thread and blocks the caller); weights go into the one reused buffer.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path
from typing import Iterator

from loraplex_common.adapter_format import ADAPTER_FILES, CONFIG_FILE, MAX_CONFIG_BYTES, WEIGHTS_FILE, Into, read_file

from .errors import AdapterInvalid, ConfigError, InvalidTenantId
from .ids import validate_tenant_id
from .schema import TenantRecord
from .store import CHUNK, S3_SCHEME, AdapterStore, StoreError, open_source
from .validate import AdapterManifest

_VERSION_DIR = re.compile(r"v([0-9]{1,18})")
S3_RETRIES = 3  # attempts per request, for botocore and for s3fs
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's bucket naming rule


class S3AdapterStore(AdapterStore):
    """An `s3://bucket/prefix` adapter store: `AdapterStore`'s interface except `path_for`, since
    objects have no local path. One thread reads (the worker's owner thread, or the CLI)."""

    def __init__(self, uri: str, *, endpoint: str = "") -> None:
        try:
            import s3fs
        except ImportError:
            raise ConfigError(f"adapter_store {uri!r} needs s3fs: pip install 'loraplex[s3]'",
                              key="adapter_store") from None
        bucket, _, key_prefix = uri[len(S3_SCHEME):].partition("/")
        parts = [p for p in key_prefix.split("/") if p]
        if not _BUCKET.fullmatch(bucket) or any(p in (".", "..") for p in parts):
            raise ConfigError(f"adapter_store {uri!r}: expected s3://bucket[/prefix]", key="adapter_store")
        bucket_key = "/".join([bucket, *parts])
        super().__init__(Path("."))  # the reused read buffer; `root` is not used by this store
        self.uri = f"{S3_SCHEME}{bucket_key}"
        self._base = bucket_key
        # No listings cache: another process (tenantctl, another worker) changes the bucket. Retries
        # bounded (botocore's standard mode, s3fs's own loop): a worker's read of a store that is down
        # fails (the adapter is quarantined, the tenant falls back) in seconds, not tens of seconds.
        self._fs = s3fs.S3FileSystem(endpoint_url=endpoint or None, use_listings_cache=False,
                                     skip_instance_cache=True,
                                     config_kwargs={"connect_timeout": 5, "read_timeout": 60,
                                                    "retries": {"mode": "standard", "max_attempts": S3_RETRIES}})
        self._fs.retries = S3_RETRIES  # s3fs's class default is 5; this instance is private (no instance cache)

    @property
    def location(self) -> str:
        return self.uri

    # ------------------------------------------------------------------ reading (workers)
    def path_for(self, record: TenantRecord) -> Path:
        raise StoreError(f"the adapter store {self.uri} is an object store: {record.adapter_id} has no local path")

    def key_for(self, record: TenantRecord) -> str:
        """The object key prefix (`bucket/prefix/<tenant>/v<N>`) of `record`. A path that is not
        exactly `<tenant id>/v<N>` (what onboarding writes) is a StoreError: no `..`, no other prefix."""
        tenant, _, vdir = record.path.partition("/")
        try:
            ok = validate_tenant_id(tenant) == tenant and _VERSION_DIR.fullmatch(vdir) is not None
        except InvalidTenantId:
            ok = False
        if not ok:
            raise StoreError(f"adapter path {record.path!r} of {record.adapter_id} is not <tenant>/v<N> in the "
                             "adapter store")
        return f"{self._base}/{record.path}"

    def has(self, record: TenantRecord) -> bool:
        """As `AdapterStore.has`; an unreachable store is a StoreError, not a False."""
        try:
            key = self.key_for(record)
        except StoreError:
            return False
        with self._client_errors("checking " + record.adapter_id):
            return all(self._fs.exists(f"{key}/{name}") for name in ADAPTER_FILES)

    def verify(self, record: TenantRecord) -> str:  # type: ignore[override]
        """`read` for its checks only; returns the version's URI."""
        self.read(record)
        return f"{S3_SCHEME}{self.key_for(record)}"

    def _load(self, record: TenantRecord) -> tuple[bytes, bytes | memoryview]:
        key = self.key_for(record)
        weights = self._read_object(record, f"{key}/{WEIGHTS_FILE}", None, self._weights_buffer)
        raw_cfg = bytes(self._read_object(record, f"{key}/{CONFIG_FILE}", MAX_CONFIG_BYTES))
        return raw_cfg, weights

    def _read_object(self, record: TenantRecord, key: str, limit: int | None,
                     into: Into | None = None) -> bytes | memoryview:
        name = key.rsplit("/", 1)[1]
        try:
            with self._fs.open(key, "rb", cache_type="none") as fh:  # size from the open's HEAD, bytes from one GET
                if limit is not None and fh.size > limit:
                    raise AdapterInvalid(f"{record.adapter_id}: stored object is over {limit} bytes",
                                         code="config_mismatch", file=name)
                return read_file(fh, fh.size, into)
        except AdapterInvalid:
            raise
        except FileNotFoundError:
            raise AdapterInvalid(f"{record.adapter_id}: stored object missing", code="missing_file",
                                 file=name) from None
        except Exception as e:  # the client raises its own types for network/auth failures: all mean unreadable
            raise AdapterInvalid(f"{record.adapter_id}: stored object unreadable ({type(e).__name__})",
                                 code="missing_file", file=name) from e

    # ------------------------------------------------------------------ writing (onboarding)
    def install(self, tenant: str, version: int, src_dir: str | os.PathLike, manifest: AdapterManifest) -> str:
        """Upload exactly the two adapter files of `src_dir` under `<tenant>/v<version>/` and return that
        relpath. The uploaded bytes must hash to what validation saw (else AdapterInvalid
        "changed_during_copy"), and so must the objects read back; on any failure the version's objects
        are deleted. Refuses a version prefix that already holds objects (StoreError)."""
        rel = self.relpath(tenant, version)
        prefix = f"{self._base}/{rel}"
        if self._list(prefix):
            raise StoreError(f"adapter store already has {rel}; versions are never overwritten")
        expected = {CONFIG_FILE: manifest.config_sha256, WEIGHTS_FILE: manifest.sha256}
        try:
            for name in ADAPTER_FILES:
                if self._upload(Path(src_dir) / name, f"{prefix}/{name}") != expected[name]:
                    raise AdapterInvalid("changed between validation and copy", code="changed_during_copy",
                                         file=name)
            for name in ADAPTER_FILES:
                if self._sha256_of(f"{prefix}/{name}") != expected[name]:
                    raise StoreError(f"adapter store {self.uri} returned other bytes for {rel}/{name} than were "
                                     "written")
        except BaseException as e:
            with contextlib.suppress(StoreError):  # the first failure is the one to report
                self._remove(prefix)
            if isinstance(e, (AdapterInvalid, StoreError)) or not isinstance(e, Exception):
                raise
            raise StoreError(f"adapter store {self.uri}: writing {rel} failed ({type(e).__name__}: {e})") from e
        return rel

    def remove_version(self, tenant: str, version: int) -> None:
        self._remove(f"{self._base}/{self.relpath(tenant, version)}")

    def remove_tenant(self, tenant: str) -> None:
        self._remove(f"{self._base}/{validate_tenant_id(tenant)}")

    def tenant_versions(self, tenant: str) -> list[int]:
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in self._list(f"{self._base}/{validate_tenant_id(tenant)}"))
        return sorted(int(m.group(1)) for n in names if (m := _VERSION_DIR.fullmatch(n)))

    def _list(self, prefix: str) -> list[str]:
        with self._client_errors("listing " + prefix):
            try:
                return self._fs.ls(prefix, detail=False, refresh=True)
            except FileNotFoundError:
                return []

    def _remove(self, prefix: str) -> None:
        """Delete every object under `prefix/` (missing is fine)."""
        if self._list(prefix):
            with self._client_errors("deleting " + prefix):
                self._fs.rm(prefix, recursive=True)

    @contextlib.contextmanager
    def _client_errors(self, what: str) -> Iterator[None]:
        """The client's own exception types (network, auth, throttling: botocore's, not OSError) as a
        StoreError naming the store, so `tenantctl` reports them like any store failure."""
        try:
            yield
        except (StoreError, AdapterInvalid, FileNotFoundError):
            raise
        except Exception as e:
            raise StoreError(f"adapter store {self.uri}: {what} failed ({type(e).__name__}: {e})") from e

    def _upload(self, src: Path, key: str) -> str:
        """Stream `src` (not following symlinks) to the object `key`; the sha256 of the bytes sent."""
        h = hashlib.sha256()
        with open_source(src) as fin, self._fs.open(key, "wb") as fout:
            while chunk := fin.read(CHUNK):
                h.update(chunk)
                fout.write(chunk)
        return h.hexdigest()

    def _sha256_of(self, key: str) -> str:
        h = hashlib.sha256()
        with self._fs.open(key, "rb", cache_type="none", block_size=8 * CHUNK) as fh:
            while chunk := fh.read(8 * CHUNK):
                h.update(chunk)
        return h.hexdigest()

