"""Per-tenant quotas on what onboarding may add: tasks owned, versions kept per task, adapter bytes.

The one call site is `onboarding.onboard`, after the adapter is validated (its size is known) and
before anything is written, so `tenantctl onboard`, the operator's HTTP upload and a tenant's own
publish (tenant_registry/http_api.py) are all held to the same limits with the same message.

Limits (LoraplexConfig; 0 = no limit):
  quota_max_tasks     tasks one tenant may own; a version of a task it already owns never counts
  quota_max_versions  versions kept in one task's history (what rollback can reach); a new version
                      beyond it is refused: `remove` the task (or raise the limit) to go on
  quota_max_bytes     bytes of every version of every task the tenant keeps in the store
                      (history records' `nbytes`: the store keeps every version a history names)

Refusals are `QuotaExceeded` (a RegistryError; nothing is written). HTTP answers 409 for tasks and
versions (the tenant's current state conflicts: remove something first) and 413 for bytes (the
upload is too large for what is left); tenantctl exits 1 ("other").

Concurrency: the check reads the registry, then onboarding writes; two onboardings of one tenant
racing may both pass a limit they exceed together (by at most one version each). The limits are
an operator's guard against a tenant filling the store, not a transactional invariant.
"""
from __future__ import annotations

from dataclasses import dataclass

from loraplex_common.config import LoraplexConfig
from .errors import RegistryError, TenantNotFound
from .registry import TenantRegistry

QUOTAS = ("tasks", "versions", "bytes")


class QuotaExceeded(RegistryError):
    """Onboarding would take the tenant past one of its quotas; `quota` is one of QUOTAS."""

    def __init__(self, message: str, *, quota: str, limit: int, used: int) -> None:
        super().__init__(message)
        self.quota = quota
        self.limit = limit
        self.used = used
        self.code = f"quota_{quota}"


@dataclass(frozen=True)
class QuotaLimits:
    max_tasks: int = 0
    max_versions: int = 0
    max_bytes: int = 0

    @classmethod
    def from_config(cls, config: LoraplexConfig) -> "QuotaLimits":
        return cls(config.quota_max_tasks, config.quota_max_versions, config.quota_max_bytes)

    def to_dict(self) -> dict[str, int]:
        return {"max_tasks": self.max_tasks, "max_versions": self.max_versions, "max_bytes": self.max_bytes}


@dataclass(frozen=True)
class QuotaUsage:
    """What a tenant holds now: versions kept per task (task -> count) and bytes over all of them."""

    versions: dict[str, int]
    nbytes: int

    def to_dict(self) -> dict[str, object]:
        return {"tasks": len(self.versions), "versions": dict(self.versions), "bytes": self.nbytes}


def usage(registry: TenantRegistry, tenant: str) -> QuotaUsage:
    """The tenant's current usage (an unknown tenant holds nothing). Raises RegistryUnavailable."""
    versions: dict[str, int] = {}
    nbytes = 0
    try:
        tasks = registry.tasks(tenant)
    except TenantNotFound:
        return QuotaUsage({}, 0)
    for task in tasks:
        try:
            hist = registry.history(tenant, task=task)
        except TenantNotFound:  # removed between the two reads
            continue
        versions[task] = len(hist)
        nbytes += sum(h.nbytes for h in hist)
    return QuotaUsage(versions, nbytes)


def check(limits: QuotaLimits, used: QuotaUsage, tenant: str, task: str, nbytes: int) -> None:
    """Raise QuotaExceeded if adding one version of `nbytes` bytes to `task` breaks a limit."""
    if limits.max_tasks and task not in used.versions and len(used.versions) >= limits.max_tasks:
        raise QuotaExceeded(f"quota exceeded: tenant {tenant!r} already owns {len(used.versions)} task(s) "
                            f"(quota_max_tasks = {limits.max_tasks}); remove a task before adding {task!r}",
                            quota="tasks", limit=limits.max_tasks, used=len(used.versions))
    kept = used.versions.get(task, 0)
    if limits.max_versions and kept >= limits.max_versions:
        raise QuotaExceeded(f"quota exceeded: task {task!r} of tenant {tenant!r} already keeps {kept} version(s) "
                            f"(quota_max_versions = {limits.max_versions}); remove the task or raise the quota",
                            quota="versions", limit=limits.max_versions, used=kept)
    if limits.max_bytes and used.nbytes + nbytes > limits.max_bytes:
        raise QuotaExceeded(f"quota exceeded: tenant {tenant!r} keeps {used.nbytes} adapter bytes; {nbytes} more "
                            f"would pass quota_max_bytes = {limits.max_bytes}",
                            quota="bytes", limit=limits.max_bytes, used=used.nbytes)


def enforce(registry: TenantRegistry, config: LoraplexConfig, tenant: str, task: str, nbytes: int) -> None:
    """check() against the registry's current usage: what `onboard` calls before it writes."""
    limits = QuotaLimits.from_config(config)
    if not (limits.max_tasks or limits.max_versions or limits.max_bytes):
        return
    check(limits, usage(registry, tenant), tenant, task, nbytes)
