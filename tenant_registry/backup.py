"""Backup and restore of the whole tenant registry as one JSON document (`tenantctl export/import`).

Document (format_version 1):
  {
    "format": "loraplex-registry-backup",
    "format_version": 1,
    "exported_at": <epoch seconds>,
    "prefix": "<redis prefix it was exported from>",       (informational; import may use another)
    "tenants": [                                            (sorted by tenant id)
      {"tenant_id": t,
       "current": <TenantRecord> | null,                    (the default task's; status included;
                                                             null when the tenant has no default task)
       "history": [<TenantRecord>, ...],                    (oldest first; [] with a null current)
       "tasks": {"<task>": {"current", "history"}, ...},    (named tasks; only when it has some)
       "key_digest": {"salt", "digest", "created_at"} | null,   (the salted digest, never a key)
       "policy": <TenantPolicy>}                            (splits, chain, router, examples; only
                                                             when the tenant has one)
    ],
    "version_seq": {t: n, ...}   (every tenant's version counter, removed tenants included, so an
                                  adapter id "t@vN" is never reused after a restore)
  }

What is NOT in it: the adapter files. Records point into the adapter store (`adapter_store`, a plain
directory of immutable `<tenant>/v<N>/` copies); back that directory up alongside the export (any file
copy or snapshot works, since versions are never modified in place) and restore it to the same path
before or together with `import`. Workers verify each file's sha256 against the record at load, so a
mismatched store is detected, never served.

Consistency: each tenant is read in one MULTI/EXEC, so its record, history, key digest and counter
agree with each other; different tenants may be read a few milliseconds apart while others write.

Import: the whole document is parsed and every record is validated with the strict schemas
(TenantRecord, KeyDigest, TenantSnapshot's cross-checks) before anything is written; a document with
any problem raises BackupInvalid and writes nothing. Then, unless `replace`, any tenant that already
exists in the target makes the import refuse (TenantExists) before anything is written. Each tenant is
then written in one transaction (all of it or none of it) with an "import" event, so a worker never
sees half a tenant. Tenants present in the target but absent from the backup are left alone. Version
counters are never lowered. Import into an empty prefix recreates exactly what was exported.

Control-plane code (CLI process); not for workers.
"""
from __future__ import annotations

import math
import time
from typing import Any

from .errors import PolicyInvalid, RegistryError, TenantExists
from .ids import is_valid_tenant_id
from .keys import KeyDigest
from .registry import TaskLine, TenantRegistry, TenantSnapshot
from .schema import RecordError, TenantPolicy, TenantRecord

FORMAT = "loraplex-registry-backup"
FORMAT_VERSION = 1
_TOP_FIELDS = {"format", "format_version", "exported_at", "prefix", "tenants", "version_seq"}
_TENANT_FIELDS = {"tenant_id", "current", "history", "key_digest"}
_OPTIONAL_TENANT_FIELDS = {"tasks", "policy"}  # absent for tenants without named tasks / a policy (and in older backups)
_LINE_FIELDS = {"current", "history"}


class BackupInvalid(RegistryError):
    """A backup document is malformed or fails validation; nothing was written."""


def export_registry(registry: TenantRegistry) -> dict[str, Any]:
    """The whole registry under `registry.prefix` as a JSON-ready dict (see the module docstring).
    Raises RegistryUnavailable, RecordError/KeyDigestError if Redis holds a corrupt entry."""
    tenants = []
    for t in registry.tenant_ids():
        snap = registry.snapshot(t)
        if snap is None:  # removed while we were exporting
            continue
        entry = {"tenant_id": t, "current": snap.current.to_dict() if snap.current else None,
                 "history": [h.to_dict() for h in snap.history],
                 "key_digest": snap.key_digest.to_dict() if snap.key_digest else None}
        if snap.tasks:
            entry["tasks"] = {line.current.task: {"current": line.current.to_dict(),
                                                  "history": [h.to_dict() for h in line.history]}
                              for line in snap.tasks}
        if snap.policy is not None:
            entry["policy"] = snap.policy.to_dict()
        tenants.append((entry, snap.version_seq))
    counters = registry.version_counters()
    for entry, seq in tenants:  # the snapshot's counter is authoritative for tenants read above
        t = entry["tenant_id"]
        counters[t] = max(counters.get(t, 0), seq)
    tenants = [entry for entry, _ in tenants]
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "exported_at": time.time(),
            "prefix": registry.prefix, "tenants": tenants, "version_seq": dict(sorted(counters.items()))}


def parse_backup(data: Any) -> tuple[list[TenantSnapshot], dict[str, int]]:
    """Validate a backup document completely; return the tenant snapshots and every version counter.
    Raises BackupInvalid naming the first problem."""
    if not isinstance(data, dict):
        raise BackupInvalid("backup must be a JSON object")
    if data.get("format") != FORMAT:
        raise BackupInvalid(f"not a loraplex registry backup (format must be {FORMAT!r})")
    if data.get("format_version") != FORMAT_VERSION or isinstance(data.get("format_version"), bool):
        raise BackupInvalid(f"unsupported backup format_version {data.get('format_version')!r} "
                            f"(this tenantctl reads {FORMAT_VERSION})")
    unknown, missing = sorted(set(data) - _TOP_FIELDS), sorted(_TOP_FIELDS - set(data))
    if unknown or missing:
        raise BackupInvalid(f"backup fields: unknown {unknown}, missing {missing}")
    ea = data["exported_at"]
    if isinstance(ea, bool) or not isinstance(ea, (int, float)) or not math.isfinite(ea):
        raise BackupInvalid("backup exported_at must be epoch seconds")
    if not isinstance(data["prefix"], str):
        raise BackupInvalid("backup prefix must be a string")
    seqs = data["version_seq"]
    if not isinstance(seqs, dict):
        raise BackupInvalid("backup version_seq must be an object")
    for t, n in seqs.items():
        if not is_valid_tenant_id(t) or isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise BackupInvalid(f"backup version_seq entry {t!r}: {n!r} is not a valid tenant counter")
    if not isinstance(data["tenants"], list):
        raise BackupInvalid("backup tenants must be a list")

    snaps: list[TenantSnapshot] = []
    seen: set[str] = set()
    for i, entry in enumerate(data["tenants"]):
        where = f"tenants[{i}]"
        if not isinstance(entry, dict):
            raise BackupInvalid(f"{where} must be an object")
        unknown = sorted(set(entry) - _TENANT_FIELDS - _OPTIONAL_TENANT_FIELDS)
        missing = sorted(_TENANT_FIELDS - set(entry))
        if unknown or missing:
            raise BackupInvalid(f"{where} fields: unknown {unknown}, missing {missing}")
        t = entry["tenant_id"]
        if not is_valid_tenant_id(t):
            raise BackupInvalid(f"{where}: invalid tenant id {str(t)[:80]!r}")
        where = f"tenant {t!r}"
        if t in seen:
            raise BackupInvalid(f"{where} appears twice")
        seen.add(t)
        if t not in seqs:
            raise BackupInvalid(f"{where} has no version_seq entry")
        if not isinstance(entry["history"], list):
            raise BackupInvalid(f"{where}: history must be a list")
        tasks = entry.get("tasks", {})
        if not isinstance(tasks, dict) or not all(isinstance(v, dict) and set(v) == _LINE_FIELDS
                                                  and isinstance(v["history"], list) for v in tasks.values()):
            raise BackupInvalid(f"{where}: tasks must map task names to {{current, history}} objects")
        try:
            current = None if entry["current"] is None else TenantRecord.from_dict(entry["current"])
            history = tuple(TenantRecord.from_dict(h) for h in entry["history"])
            lines = []
            for name, line in tasks.items():
                rec = TenantRecord.from_dict(line["current"])
                if rec.task != name or name == "default":
                    raise RecordError(f"task {str(name)[:40]!r} holds a record of task {rec.task!r}")
                lines.append(TaskLine(rec, tuple(TenantRecord.from_dict(h) for h in line["history"])))
            kd = entry["key_digest"]
            digest = None if kd is None else KeyDigest.from_dict(kd)
            for rec in [current, *(line.current for line in lines)]:
                if rec is not None and rec.tenant_id != t:
                    raise RecordError(f"current record is of tenant {rec.tenant_id!r}")
            if current is not None and current.task != "default":
                raise RecordError(f"current record is of task {current.task!r}, not 'default'")
            policy = TenantPolicy.from_dict(entry["policy"]) if "policy" in entry else None
            snaps.append(TenantSnapshot(current=current, history=history, key_digest=digest,
                                        version_seq=seqs[t], tasks=tuple(lines), policy=policy))
        except (RecordError, PolicyInvalid, TypeError) as e:
            raise BackupInvalid(f"{where}: {e}") from e
    return snaps, {str(t): int(n) for t, n in seqs.items()}


def import_registry(registry: TenantRegistry, data: Any, *, replace: bool = False) -> int:
    """Restore a backup made by `export_registry` into `registry`; return the number of tenants written.

    Validates everything first (BackupInvalid, nothing written); refuses with TenantExists, before
    writing anything, if a tenant already exists and not `replace`. Each tenant is then written
    atomically. Raises RegistryUnavailable if Redis fails (tenants already written stay written: run
    the import again with replace=True to finish it).
    """
    snaps, seqs = parse_backup(data)
    if not replace:
        existing = [s.tenant_id for s in snaps if registry.exists(s.tenant_id)]
        if existing:
            raise TenantExists(f"{len(existing)} tenant(s) already exist ({', '.join(existing[:10])}"
                               f"{', ...' if len(existing) > 10 else ''}); nothing imported. "
                               "Use replace (tenantctl import --replace) to overwrite them")
    for snap in snaps:
        registry.restore(snap, replace=replace)
    in_snaps = {s.tenant_id for s in snaps}
    for t, n in seqs.items():
        if t not in in_snaps:  # removed tenants: keep their numbers used
            registry.raise_version_counter(t, n)
    return len(snaps)
