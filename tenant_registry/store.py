"""AdapterStore: the directory tree that workers load adapters from (and `open_store`, which picks
it or the object-store variant, `tenant_registry.s3_store.S3AdapterStore`, from `adapter_store`).

Layout: `<root>/<tenant>/v<version>/{adapter_config.json,adapter_model.safetensors}`.
A version directory is written once and never modified; a new version is a new
directory. Work in progress lives in `<root>/.staging/` (same file system, so
the final rename is atomic): a crash leaves at most a staging directory, never
a half-written version directory.

Who calls what:
  * `install`, `remove_version`, `remove_tenant` -- onboarding / CLI processes only.
  * `read` -- workers (any thread; it only reads): the adapter's bytes, read once, their sha256
    checked against the record; the engine loads from those same bytes (`AdapterBytes`).
  * `path_for`, `verify`, `has` -- tools and the CLI (verify = read and discard).
Callers never pass paths from requests; `path_for` takes a TenantRecord and
refuses any location that resolves outside the root (symlinks included).

A shared file system (NFS, CephFS, EFS, ...) mounted at the same path on every host is a local
store here: staging lives inside the root, so the rename stays on that file system.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import BinaryIO

from loraplex_common.adapter_format import (ADAPTER_FILES, CONFIG_FILE, MAX_CONFIG_BYTES, WEIGHTS_FILE, AdapterBytes,
                                            Into, ReadBuffer, read_file)

from .errors import AdapterInvalid, ConfigError, RegistryError
from .ids import validate_tenant_id
from .schema import TenantRecord
from .validate import AdapterManifest

STAGING = ".staging"
CHUNK = 1 << 20
S3_SCHEME = "s3://"


class StoreError(RegistryError):
    """The store refused an operation (escape attempt, existing version, I/O error)."""


def open_store(location: str | os.PathLike, endpoint: str = "") -> "AdapterStore":
    """The store `adapter_store` names: `s3://bucket/prefix` (an S3 or S3-compatible object store at
    `endpoint`, "" = the client's default; needs the `s3` extra) or a local / shared-file-system
    directory. Another `scheme://` is a ConfigError naming the key."""
    loc = os.fspath(location)
    if loc.startswith(S3_SCHEME):
        from .s3_store import S3AdapterStore  # s3fs is an optional extra: imported only for an s3:// store

        return S3AdapterStore(loc, endpoint=endpoint)
    if "://" in loc:
        raise ConfigError(f"adapter_store {loc!r}: only a directory or an s3://bucket/prefix URI is supported",
                          key="adapter_store")
    return AdapterStore(loc)


class AdapterStore:
    """A root directory of immutable, versioned adapter copies.

    `read` puts an adapter's weights into one buffer reused by every read (`ReadBuffer`, grown to
    the largest adapter read), so what it returns is valid until its next read: the worker loads it
    right away. One thread reads (the worker's owner thread, or the CLI)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._weights_buffer = ReadBuffer()

    @property
    def location(self) -> str:
        """Where the store is, for messages (the resolved root directory here)."""
        return str(self.root.resolve())

    # ------------------------------------------------------------------ reading (workers)
    def relpath(self, tenant: str, version: int) -> str:
        """The record `path` for a tenant version, relative to the root."""
        return f"{validate_tenant_id(tenant)}/v{int(version)}"

    def path_for(self, record: TenantRecord) -> Path:
        """Absolute directory of `record`'s adapter. Raises StoreError if it would leave the root."""
        root = self.root.resolve()
        target = (root / record.path).resolve()
        if target == root or not target.is_relative_to(root):
            raise StoreError(f"adapter path {record.path!r} of {record.adapter_id} escapes the adapter store")
        if target.is_relative_to(root / STAGING):
            raise StoreError(f"adapter path {record.path!r} points into the staging area")
        return target

    def read(self, record: TenantRecord) -> AdapterBytes:
        """The stored adapter of `record`, read once: its weights' sha256 is checked on exactly the
        bytes returned, and adapter_config.json must still say LORA with the record's r / lora_alpha /
        use_rslora (the engine then applies every adapter rule to these bytes). Raises AdapterInvalid
        (code "missing_file", "sha256_mismatch" or "config_mismatch") naming the adapter and file,
        StoreError for a path outside the store.
        """
        raw_cfg, weights = self._load(record)
        return check_stored(record, raw_cfg, weights)

    def has(self, record: TenantRecord) -> bool:
        """Whether both files of `record`'s version are in the store (not checked: `verify` does that)."""
        try:
            d = self.path_for(record)
        except RegistryError:
            return False
        return (d / WEIGHTS_FILE).is_file() and (d / CONFIG_FILE).is_file()

    def _load(self, record: TenantRecord) -> tuple[bytes, bytes | memoryview]:
        """(config bytes, weights bytes) of `record`'s version, the weights in the reused buffer."""
        d = self.path_for(record)
        weights = self._read_file(record, d / WEIGHTS_FILE, None, self._weights_buffer)
        raw_cfg = bytes(self._read_file(record, d / CONFIG_FILE, MAX_CONFIG_BYTES))
        return raw_cfg, weights

    def verify(self, record: TenantRecord) -> Path:
        """`read` for its checks only (the CLI, before pointing workers at a version); returns the directory."""
        self.read(record)
        return self.path_for(record)

    @staticmethod
    def _read_file(record: TenantRecord, path: Path, limit: int | None, into: Into | None = None) -> bytes | memoryview:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
            with os.fdopen(fd, "rb") as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise AdapterInvalid(f"{record.adapter_id}: stored file is not a regular file",
                                         code="missing_file", file=path.name)
                if limit is not None and st.st_size > limit:
                    raise AdapterInvalid(f"{record.adapter_id}: stored file is over {limit} bytes",
                                         code="config_mismatch", file=path.name)
                return read_file(fh, st.st_size, into)
        except OSError as e:
            raise AdapterInvalid(f"{record.adapter_id}: stored file unreadable ({e.strerror})", code="missing_file",
                                 file=path.name) from e

    # ------------------------------------------------------------------ writing (onboarding)
    def install(self, tenant: str, version: int, src_dir: str | os.PathLike, manifest: AdapterManifest) -> str:
        """Copy exactly the two adapter files of `src_dir` to `<tenant>/v<version>` and return that relpath.

        Copies into `<root>/.staging/<random>/`, checks the copied bytes hash to what validation saw
        (so a file swapped after validation is refused), fsyncs files and directory, then renames
        atomically. Refuses to overwrite an existing version.
        """
        rel = self.relpath(tenant, version)
        final = self.root / rel
        staging_root = self.root / STAGING
        staging_root.mkdir(parents=True, exist_ok=True)
        tmp = staging_root / f"{tenant}-v{version}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            expected = {CONFIG_FILE: manifest.config_sha256, WEIGHTS_FILE: manifest.sha256}
            for name in ADAPTER_FILES:
                got = _copy_file(Path(src_dir) / name, tmp / name)
                if got != expected[name]:
                    raise AdapterInvalid("changed between validation and copy", code="changed_during_copy",
                                         file=name)
            _fsync_dir(tmp)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                raise StoreError(f"adapter store already has {rel}; versions are never overwritten")
            os.rename(tmp, final)
            _fsync_dir(final.parent)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return rel

    def remove_version(self, tenant: str, version: int) -> None:
        """Delete one version directory (missing is fine); the tenant dir goes too once empty."""
        d = self.root / self.relpath(tenant, version)
        self._rmtree_inside(d)
        try:
            d.parent.rmdir()
        except OSError:
            pass

    def remove_tenant(self, tenant: str) -> None:
        """Delete every stored version of `tenant` (missing is fine)."""
        self._rmtree_inside(self.root / validate_tenant_id(tenant))

    def tenant_versions(self, tenant: str) -> list[int]:
        """Versions that have a directory in the store (for audits and tests)."""
        d = self.root / validate_tenant_id(tenant)
        if not d.is_dir():
            return []
        return sorted(int(p.name[1:]) for p in d.iterdir() if p.name[:1] == "v" and p.name[1:].isdigit())

    def _rmtree_inside(self, d: Path) -> None:
        root = self.root.resolve()
        if d.is_symlink():
            raise StoreError(f"refusing to remove {d}: it is a symlink")
        if not d.exists():
            return
        resolved = d.resolve()
        if resolved == root or not resolved.is_relative_to(root):
            raise StoreError(f"refusing to remove {d}: outside the adapter store")
        shutil.rmtree(resolved)


def check_stored(record: TenantRecord, raw_cfg: bytes, weights: bytes | memoryview) -> AdapterBytes:
    """The adapter of `record` from the bytes a store just read, checked (every store's one rule):
    the sha256 of exactly these weights is the record's, and the config still says LORA with the
    record's r / lora_alpha / use_rslora. Raises AdapterInvalid ("sha256_mismatch", "config_mismatch")."""
    adapter = AdapterBytes.of(raw_cfg, weights, record.adapter_id)
    if adapter.sha256 != record.sha256:
        raise AdapterInvalid(f"{record.adapter_id}: sha256 mismatch (stored file altered)",
                             code="sha256_mismatch", file=WEIGHTS_FILE)
    try:
        cfg = json.loads(raw_cfg.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise AdapterInvalid(f"{record.adapter_id}: stored config is not valid JSON", code="config_mismatch",
                             file=CONFIG_FILE) from None
    alpha = cfg.get("lora_alpha", 8) if isinstance(cfg, dict) else None
    ok = (isinstance(cfg, dict) and cfg.get("peft_type") == "LORA" and cfg.get("r") == record.rank
          and type(alpha) in (int, float) and float(alpha) == record.alpha
          and bool(cfg.get("use_rslora", False)) == record.use_rslora and not cfg.get("use_dora"))
    if not ok:
        raise AdapterInvalid(f"{record.adapter_id}: stored config no longer matches the record",
                             code="config_mismatch", file=CONFIG_FILE)
    return adapter


def open_source(src: Path) -> BinaryIO:
    """An onboarding source file opened for reading, not following symlinks; AdapterInvalid
    ("not_regular_file") for anything but a regular file (a FIFO swapped in after validation)."""
    fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    fin = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fin.fileno()).st_mode):
        fin.close()
        raise AdapterInvalid("is not a regular file", code="not_regular_file", file=src.name)
    return fin


def _copy_file(src: Path, dst: Path) -> str:
    """Stream-copy src (not following symlinks) to a new file dst, fsync it, return the sha256 of the bytes."""
    h = hashlib.sha256()
    with open_source(src) as fin:
        with open(dst, "xb") as fout:
            while chunk := fin.read(CHUNK):
                h.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
    os.chmod(dst, 0o644)
    return h.hexdigest()


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
