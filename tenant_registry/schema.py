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
from dataclasses import dataclass, field, fields
from pathlib import PurePosixPath
from types import MappingProxyType
from typing import Any, Mapping

from .errors import RegistryError
from .errors import InvalidTaskName, PolicyInvalid
from .ids import DEFAULT_TASK, format_link, parse_link, validate_task, validate_tenant_id
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
        return cls.from_dict(_json_loads(text, RecordError, "record is not valid JSON"))


def _json_loads(text: str | bytes, error: type[Exception], what: str) -> Any:
    """`text` parsed as JSON; `error` naming `what` and the parse error otherwise."""
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{what}: {e}") from None


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


# ---------------------------------------------------------------------------- the tenant policy
# One JSON document per tenant (registry key P:policy:<t>; absent = TenantPolicy()): how its requests
# pick a task (router, examples), a version (A/B splits) and whether answers fall back (chain). Unlike
# TenantRecord, unknown JSON fields are ignored and missing ones take their defaults, so a newer
# control plane may add a field without older workers refusing the whole policy. Everything else is
# checked as strictly as a record (PolicyInvalid naming the part). Whether the tasks and versions it
# names exist is the registry's check (registry.check_policy), made whenever a policy is written.
ROUTERS = ("header", "classify")
UNKNOWN_TASK_POLICIES = ("reject", "default")  # a tenant's own choice; None in the policy = the worker's config
MAX_SPLIT_ARMS = 16
MAX_SPLIT_WEIGHT = 1_000_000
MAX_CHAIN_LINKS = 8
MAX_EXAMPLES_PER_TASK = 64
MAX_EXAMPLE_CHARS = 4096


@dataclass(frozen=True)
class SplitArm:
    """One version of a task line in an A/B split. Weights are relative (90/10 and 9/1 alike)."""

    version: int
    weight: int

    def __post_init__(self) -> None:
        _policy_check(_is_int(self.version) and self.version >= 1, f"split version must be an integer >= 1, "
                      f"got {self.version!r}"[:120])
        _policy_check(_is_int(self.weight) and 0 < self.weight <= MAX_SPLIT_WEIGHT,
                      f"split weight must be an integer in 1..{MAX_SPLIT_WEIGHT}, got {self.weight!r}"[:120])


@dataclass(frozen=True)
class ChainLink:
    """One link of a confidence fallback chain: a task's current version (`version` None), a given
    version of it, or the plain base model (`base`, the chain's last link; its task/version unused)."""

    task: str = DEFAULT_TASK
    version: int | None = None
    base: bool = False

    def __post_init__(self) -> None:
        _policy_check(isinstance(self.base, bool), "a chain link's base must be true or false")
        try:
            validate_task(self.task)
        except InvalidTaskName as e:
            raise PolicyInvalid(f"invalid tenant policy: chain link: {e}") from None
        _policy_check(self.version is None or (_is_int(self.version) and self.version >= 1),
                      "a chain link's version must be an integer >= 1 or absent")
        _policy_check(not self.base or (self.version is None and self.task == DEFAULT_TASK),
                      "the base link names no task or version")


def _frozen_map(m: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(sorted(m.items())))


@dataclass(frozen=True)
class TenantPolicy:
    """Per tenant: router, A/B splits, fallback chain, router examples. Immutable (its mappings are
    read-only views), so workers share one instance between threads."""

    router: str = "header"  # "header" | "classify"
    splits: Mapping[str, tuple[SplitArm, ...]] = field(default_factory=dict)  # task -> arms; no entry = no split
    chain: tuple[ChainLink, ...] = ()  # () = no chain; else ends with the base link
    chain_threshold: float | None = None  # mean token log-prob a link's answer must reach
    examples: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # task -> prompts (router "classify")
    unknown_task: str | None = None  # a request naming a task the tenant lacks: "reject" | "default"; None = worker's

    def __post_init__(self) -> None:
        _policy_check(self.router in ROUTERS, f"router must be one of {ROUTERS}, got {str(self.router)[:40]!r}")
        _policy_check(self.unknown_task is None or self.unknown_task in UNKNOWN_TASK_POLICIES,
                      f"unknown_task must be one of {UNKNOWN_TASK_POLICIES} or null (the worker's "
                      f"unknown_task_policy), got {str(self.unknown_task)[:40]!r}")
        _policy_check(isinstance(self.splits, Mapping), "splits must map task names to lists of arms")
        splits = {}
        for task, arms in self.splits.items():
            where = f"split of task {str(task)[:40]!r}"
            _policy_task(task, where)
            _policy_check(isinstance(arms, (tuple, list)) and all(isinstance(a, SplitArm) for a in arms),
                          f"{where}: arms must be a list of (version, weight)")
            _policy_check(len(arms) <= MAX_SPLIT_ARMS, f"{where}: at most {MAX_SPLIT_ARMS} arms")
            versions = [a.version for a in arms]
            _policy_check(len(set(versions)) == len(versions), f"{where}: a version appears twice")
            if arms:  # an empty list is no split: not kept
                splits[task] = tuple(arms)
        object.__setattr__(self, "splits", _frozen_map(splits))
        chain = self.chain
        _policy_check(isinstance(chain, (tuple, list)) and all(isinstance(c, ChainLink) for c in chain),
                      "chain must be a list of links")
        _policy_check(len(chain) <= MAX_CHAIN_LINKS, f"chain: at most {MAX_CHAIN_LINKS} links")
        _policy_check(not chain or (chain[-1].base and not any(c.base for c in chain[:-1])),
                      "chain must end with the 'base' link (and name it only there)")
        object.__setattr__(self, "chain", tuple(chain))
        th = self.chain_threshold
        _policy_check(th is None or _is_num(th), "chain_threshold must be a finite number (a mean log-prob) or null")
        object.__setattr__(self, "chain_threshold", None if th is None else float(th))
        _policy_check(isinstance(self.examples, Mapping), "examples must map task names to lists of prompts")
        examples = {}
        for task, texts in self.examples.items():
            where = f"examples of task {str(task)[:40]!r}"
            _policy_task(task, where)
            _policy_check(isinstance(texts, (tuple, list)) and len(texts) <= MAX_EXAMPLES_PER_TASK,
                          f"{where}: a list of at most {MAX_EXAMPLES_PER_TASK} prompts")
            _policy_check(all(isinstance(x, str) and x.strip() and len(x) <= MAX_EXAMPLE_CHARS and "\x00" not in x
                              for x in texts),
                          f"{where}: each prompt must be a non-empty string of at most {MAX_EXAMPLE_CHARS} characters")
            if texts:
                examples[task] = tuple(texts)
        object.__setattr__(self, "examples", _frozen_map(examples))

    def __hash__(self) -> int:  # the mappings are views: hash what they hold
        return hash((self.router, tuple(self.splits.items()), self.chain, self.chain_threshold,
                     tuple(self.examples.items()), self.unknown_task))

    def replace(self, **changes: Any) -> "TenantPolicy":
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def split(self, task: str) -> tuple[SplitArm, ...]:
        """The task's split arms; () when it has none."""
        return self.splits.get(task, ())

    def with_split(self, task: str, arms: "tuple[SplitArm, ...] | list[SplitArm]") -> "TenantPolicy":
        """A copy with the task's split set to `arms` (() clears it)."""
        return self.replace(splits={**self.splits, validate_task(task): tuple(arms)})

    def to_dict(self) -> dict[str, Any]:
        return {"router": self.router,
                "splits": {t: [{"version": a.version, "weight": a.weight} for a in arms]
                           for t, arms in self.splits.items()},
                "chain": [format_link(c) for c in self.chain],
                "chain_threshold": self.chain_threshold,
                "examples": {t: list(x) for t, x in self.examples.items()},
                "unknown_task": self.unknown_task}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> "TenantPolicy":
        _policy_check(isinstance(data, dict), "a tenant policy must be a JSON object")
        splits = data.get("splits", {})
        _policy_check(isinstance(splits, dict), "splits must be an object of task -> arms")
        parsed = {}
        for task, arms in splits.items():
            _policy_check(isinstance(arms, list) and all(isinstance(a, dict) and set(a) == {"version", "weight"}
                                                         for a in arms),
                          f"split of task {str(task)[:40]!r}: arms must be a list of {{version, weight}} objects")
            parsed[task] = tuple(SplitArm(a["version"], a["weight"]) for a in arms)
        chain = data.get("chain", [])
        _policy_check(isinstance(chain, list), "chain must be a list of links")
        examples = data.get("examples", {})
        _policy_check(isinstance(examples, dict), "examples must be an object of task -> prompts")
        return cls(router=data.get("router", "header"), splits=parsed, chain=tuple(parse_link(c) for c in chain),
                   chain_threshold=data.get("chain_threshold"),
                   examples={t: tuple(x) if isinstance(x, list) else x for t, x in examples.items()},
                   unknown_task=data.get("unknown_task"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "TenantPolicy":
        return cls.from_dict(_json_loads(text, PolicyInvalid, "invalid tenant policy: not valid JSON"))


def parse_arms(specs: "list[str] | tuple[str, ...]") -> tuple[SplitArm, ...]:
    """Split arms as an operator writes them: ["v3=90", "v4=10"] (also "3=90"). PolicyInvalid naming
    the bad one."""
    arms = []
    for spec in specs:
        m = re.fullmatch(r"v?([1-9][0-9]{0,8})=([0-9]{1,7})", spec) if isinstance(spec, str) else None
        _policy_check(m is not None, f"split arm {str(spec)[:40]!r}: expected 'v<version>=<weight>', e.g. v3=90")
        arms.append(SplitArm(int(m.group(1)), int(m.group(2))))
    return tuple(arms)


def _policy_task(task: Any, where: str) -> None:
    try:
        validate_task(task)
    except InvalidTaskName as e:
        raise PolicyInvalid(f"invalid tenant policy: {where}: {e}") from None


def _policy_check(ok: bool, msg: str) -> None:
    if not ok:
        raise PolicyInvalid(f"invalid tenant policy: {msg}")
