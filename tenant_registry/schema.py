"""TenantRecord: the one record schema of a tenant's adapter version, as stored in Redis.

Why strict (de)serialisation: records are read by every worker on the request
path; a record that is missing a field, has an extra one, or has a wrong type
must fail loudly at `from_json`, not later as an odd KeyError inside a batch.

Forward compatibility: `_OPTIONAL_FIELDS` lists fields that may be absent from
stored JSON (they take their dataclass default), so a later field can be added
without breaking records written before it, while typos and unknown fields are
still refused. `task` is such a field: records written before tasks existed read as the
`default` task. (The per-tenant key digest is deliberately not a record field:
it lives under its own Redis key, see keys.py/registry.py, so rotating a key
never rewrites the record or its history.)

Immutable; safe to share between threads.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import PurePosixPath
from typing import Any

from .errors import RegistryError
from .errors import InvalidTaskName
from .ids import DEFAULT_TASK, validate_task, validate_tenant_id
from .ids import adapter_id as make_adapter_id

STATUSES = ("enabled", "disabled")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# Field name -> why it may be missing in stored JSON; see the module docstring.
_OPTIONAL_FIELDS: dict[str, str] = {"task": "records written before tasks existed are the 'default' task"}


class RecordError(RegistryError):
    """A record (or its JSON) violates the schema."""


@dataclass(frozen=True)
class TenantRecord:
    """One adapter version of one task of one tenant. `path` is relative to the adapter store root."""

    tenant_id: str
    adapter_id: str
    version: int
    path: str
    sha256: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    base_model: str
    status: str
    created_at: float
    updated_at: float
    nbytes: int
    task: str = DEFAULT_TASK  # the tenant's adapter line this version belongs to (ids.validate_task)

    def __post_init__(self) -> None:
        try:
            validate_tenant_id(self.tenant_id)
        except RegistryError as e:
            raise RecordError(str(e)) from None
        try:
            validate_task(self.task)
        except InvalidTaskName as e:
            raise RecordError(str(e)) from None
        _check(_is_int(self.version) and self.version >= 1, "version must be an integer >= 1")
        expected = make_adapter_id(self.tenant_id, self.version, self.task)
        _check(self.adapter_id == expected, f"adapter_id must be {expected!r}")
        _check(isinstance(self.path, str) and _safe_relpath(self.path), "path must be a relative path inside the store")
        _check(isinstance(self.sha256, str) and _SHA256_RE.fullmatch(self.sha256) is not None,
               "sha256 must be 64 lower-case hex digits")
        _check(_is_int(self.rank) and self.rank >= 1, "rank must be an integer >= 1")
        _check(_is_num(self.alpha), "alpha must be a finite number")
        _check(isinstance(self.use_rslora, bool), "use_rslora must be a boolean")
        tm = self.target_modules
        _check(isinstance(tm, (tuple, list)) and len(tm) > 0 and all(isinstance(m, str) and m for m in tm),
               "target_modules must be a non-empty list of strings")
        object.__setattr__(self, "target_modules", tuple(sorted(set(tm))))
        object.__setattr__(self, "alpha", float(self.alpha))
        _check(isinstance(self.base_model, str), "base_model must be a string")
        _check(self.status in STATUSES, f"status must be one of {STATUSES}")
        _check(_is_num(self.created_at) and _is_num(self.updated_at), "created_at/updated_at must be epoch seconds")
        object.__setattr__(self, "created_at", float(self.created_at))
        object.__setattr__(self, "updated_at", float(self.updated_at))
        _check(_is_int(self.nbytes) and self.nbytes >= 0, "nbytes must be an integer >= 0")

    @property
    def enabled(self) -> bool:
        return self.status == "enabled"

    def replace(self, **changes: Any) -> "TenantRecord":
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["target_modules"] = list(self.target_modules)
        if self.task == DEFAULT_TASK:  # default-task records stay byte-identical to those written before tasks
            del d["task"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> "TenantRecord":
        if not isinstance(data, dict):
            raise RecordError("record must be a JSON object")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RecordError(f"unknown record field(s): {', '.join(map(repr, unknown))}")
        missing = sorted(names - set(data) - set(_OPTIONAL_FIELDS))
        if missing:
            raise RecordError(f"missing record field(s): {', '.join(missing)}")
        tm = data["target_modules"]
        _check(isinstance(tm, list), "target_modules must be a list")
        return cls(**{**data, "target_modules": tuple(tm)})

    @classmethod
    def from_json(cls, text: str | bytes) -> "TenantRecord":
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise RecordError(f"record is not valid JSON: {e}") from None
        return cls.from_dict(data)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise RecordError(f"invalid tenant record: {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _safe_relpath(p: str) -> bool:
    if not p or "\x00" in p or "\\" in p:
        return False
    pp = PurePosixPath(p)
    return not pp.is_absolute() and ".." not in pp.parts and pp.parts[:1] != (".",) and str(pp) == p
