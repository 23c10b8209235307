"""(Tenant, task) -> registry record (and key digest, the tenant's tasks, pinned versions, the tenant's
policy), with a small in-worker cache.

Why a cache: a Redis round trip per request is cheap but not free, and an
outage of Redis must not stop tenants that were already being served. The cache
is kept honest by the registry's change events (a new version, a disable, a key
rotation or a removal is dropped from the cache the moment the event arrives; an event naming a
task, one line's onboard, rollback or removal, drops that task's entries and the tenant's task list
only; a "policy" event drops the tenant's cached policy only)
and by a refresh interval (`registry_cache_s`) in case events were missed.
While Redis is unreachable, answers younger than `registry_stale_s` are served
from the cache; tenants never seen get RegistryUnavailable (503).

Concurrency: `resolve*`/`key_digest` may be called from any thread (the async
entry plans requests on a small thread pool); `on_event` is called from the
registry subscriber thread. A lock guards the cache dict, the counters and a
generation number that every event bumps, and nothing else (no Redis call is
made while holding it): an answer fetched while an event arrived is returned
but not cached, so a fetch that raced a change cannot put the old record back.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from tenant_registry.errors import RegistryUnavailable, TenantNotFound
from tenant_registry.ids import DEFAULT_TASK
from tenant_registry.registry import TenantRegistry
from tenant_registry.schema import TenantPolicy, TenantRecord


@dataclass(frozen=True)
class _Entry:
    value: Any  # a TenantRecord / KeyDigest / tuple of task names / TenantPolicy, or None when the registry has none
    fetched_at: float


class TenantResolver:
    """Answers "which record serves this tenant now?" for the request path."""

    def __init__(self, registry: TenantRegistry, *, refresh_s: float, stale_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self._refresh_s = refresh_s
        self._stale_s = max(stale_s, refresh_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str, str, int], _Entry] = {}  # (kind, tenant, task or "", version or 0)
        self.stale_hits = 0  # answers served from cache while Redis was unreachable
        self.events_seen = 0  # change events applied (subscriber thread)
        self._generation = 0  # bumped by every event: a fetch that overlapped one is not cached

    def resolve(self, tenant_id: str, task: str = DEFAULT_TASK) -> TenantRecord | None:
        """The current record of the tenant's task, or None when it has no such task (or is not registered)."""
        return self._cached("record", tenant_id, lambda t: self._fetch_record(t, task), task=task)

    def tasks(self, tenant_id: str) -> tuple[str, ...]:
        """The tenant's task names, "default" first when present; () when it is not registered."""
        return self._cached("tasks", tenant_id, lambda t: tuple(self._registry.tasks(t)))

    def key_digest(self, tenant_id: str):
        """The tenant's KeyDigest, or None when it has none (or does not exist)."""
        return self._cached("key", tenant_id, self._registry.get_key_digest)

    def policy(self, tenant_id: str) -> TenantPolicy:
        """The tenant's policy (router, A/B splits, fallback chain, examples); TenantPolicy() when it has
        none. Cached, refreshed and served stale exactly like records; a "policy" event drops it."""
        return self._cached("policy", tenant_id, self._registry.get_policy)

    def resolve_version(self, tenant_id: str, version: int, task: str = DEFAULT_TASK) -> TenantRecord | None:
        """A specific version from the history of the tenant's task (`"adapter": "<tenant>@v<N>"` or
        "<tenant>:<task>@v<N>"), or None. Cached like current records, so a pinned version keeps being
        served while Redis is down."""
        return self._cached("version", tenant_id, lambda t: self._fetch_version(t, version, task), version, task)

    def on_event(self, event: dict) -> None:
        """Registry change event (subscriber thread): forget what the event touched (one task's
        entries and the task list when it names a task, else all of the tenant's)."""
        tenant, task = event.get("tenant"), event.get("task")
        with self._lock:
            self.events_seen += 1
            self._generation += 1
            if event.get("kind") == "resync" or not isinstance(tenant, str):
                self._cache.clear()
                return
            if event.get("kind") == "policy":  # the policy alone changed: records stay cached
                self._cache.pop(("policy", tenant, "", 0), None)
                return
            for key in [k for k in self._cache if k[1] == tenant]:
                if not isinstance(task, str) or key[2] == task or key[0] == "tasks":
                    del self._cache[key]

    def _cached(self, kind: str, tenant_id: str, fetch: Callable[[str], Any], version: int = 0,
                task: str = "") -> Any:
        """Fresh entry → it; else ask Redis; Redis down → an entry younger than stale_s, or raise."""
        now = self._clock()
        key = (kind, tenant_id, task, version)
        with self._lock:
            entry = self._cache.get(key)
            generation = self._generation
        if entry is not None and now - entry.fetched_at < self._refresh_s:
            return entry.value
        try:
            value = fetch(tenant_id)
        except RegistryUnavailable:
            if entry is not None and now - entry.fetched_at < self._stale_s:
                with self._lock:
                    self.stale_hits += 1
                return entry.value
            raise
        with self._lock:
            if self._generation == generation:
                self._cache[key] = _Entry(value, now)
        return value

    def _fetch_version(self, tenant_id: str, version: int, task: str) -> TenantRecord | None:
        try:
            history = self._registry.history(tenant_id, task=task)
        except TenantNotFound:  # TaskNotFound included
            return None
        return next((record for record in history if record.version == version), None)

    def _fetch_record(self, tenant_id: str, task: str) -> TenantRecord | None:
        try:
            return self._registry.get(tenant_id, task=task)
        except TenantNotFound:  # TaskNotFound included
            return None
