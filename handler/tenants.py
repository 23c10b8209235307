"""Tenant -> registry record, with a small in-worker cache.

Why a cache: a Redis round trip per request is cheap but not free, and an
outage of Redis must not stop tenants that were already being served. The cache
is kept honest by the registry's change events (a new version, a disable or a
removal is dropped from the cache the moment the event arrives) and by a
refresh interval in case events were missed while disconnected.

Concurrency: `resolve` is called from the worker's request thread only;
`on_event` is called from the registry subscriber thread. A lock guards the
cache dict and nothing else (no Redis call is made while holding it).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from tenant_registry.errors import RegistryUnavailable, TenantNotFound
from tenant_registry.registry import TenantRegistry
from tenant_registry.schema import TenantRecord


@dataclass(frozen=True)
class _Entry:
    record: TenantRecord | None  # None = the registry says this tenant does not exist
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
        self._cache: dict[str, _Entry] = {}
        self.stale_hits = 0  # answers served from cache while Redis was unreachable

    def resolve(self, tenant_id: str) -> TenantRecord | None:
        """The tenant's current record, or None when it is not registered.

        Raises RegistryUnavailable only when Redis cannot be reached and no
        cached answer younger than `stale_s` exists."""
        now = self._clock()
        with self._lock:
            entry = self._cache.get(tenant_id)
        if entry is not None and now - entry.fetched_at < self._refresh_s:
            return entry.record
        try:
            record = self._fetch(tenant_id)
        except RegistryUnavailable:
            if entry is not None and now - entry.fetched_at < self._stale_s:
                self.stale_hits += 1
                return entry.record
            raise
        with self._lock:
            self._cache[tenant_id] = _Entry(record, now)
        return record

    def resolve_version(self, tenant_id: str, version: int) -> TenantRecord | None:
        """A specific version from the tenant's history (not cached: explicit pins are rare)."""
        try:
            history = self._registry.history(tenant_id)
        except TenantNotFound:
            return None
        for record in history:
            if record.version == version:
                return record
        return None

    def on_event(self, event: dict) -> None:
        """Registry change event (subscriber thread): forget what the event touched."""
        tenant = event.get("tenant")
        with self._lock:
            if event.get("kind") == "resync" or not isinstance(tenant, str):
                self._cache.clear()
            else:
                self._cache.pop(tenant, None)

    def cached_tenants(self) -> list[str]:
        with self._lock:
            return sorted(self._cache)

    def _fetch(self, tenant_id: str) -> TenantRecord | None:
        try:
            return self._registry.get(tenant_id)
        except TenantNotFound:
            return None
