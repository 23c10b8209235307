"""Which tenant adapters are resident in this worker's engine, and for how long.

Model: Ray Serve's multiplex LRU (an OrderedDict, hit = move to end, evict =
pop the oldest) with three additions a multi-tenant server needs:
- adapters used by the batch being served are pinned and never evicted;
- a failed verify/load is quarantined for `negative_cache_s` so a broken
  adapter is not re-read on every request;
- the new adapter is loaded *before* an old one is evicted (the engine is
  built with one spare slot), so a load that fails never costs a good resident.
Idle adapters (unused for `idle_ttl_s`) are evicted at the start of each batch
and on describe; there is no timer thread because only the worker thread may
touch the engine.

Concurrency: every method is called from the TorchServe worker's request
thread only (TorchServe calls `handle` sequentially).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator

from loraplex_common.adapter_format import AdapterBytes
from tenant_registry.schema import TenantRecord

from .engine.api import Engine
from .errors import AdapterLoadFailed

log = logging.getLogger(__name__)


@dataclass
class ResidentAdapter:
    adapter_id: str
    tenant: str
    version: int
    loaded_at: float
    last_used: float
    load_ms: float
    nbytes: int
    hits: int = 0  # requests served with it since it was loaded, the loading request included


@dataclass
class ResidencyCounters:
    loads: int = 0
    hits: int = 0  # requests served with an adapter (those that loaded it included; `loads` says how many did)
    load_failures: int = 0
    quarantine_hits: int = 0
    evictions_lru: int = 0
    evictions_idle: int = 0
    evictions_stale: int = 0


@dataclass
class _Quarantine:
    reason: str
    until: float


@dataclass
class BatchLease:
    """Adapters pinned for the batch in flight."""

    residency: "AdapterResidency"
    pinned: set[str] = field(default_factory=set)

    def acquire(self, record: TenantRecord) -> str:
        """Make the record's adapter resident and pin it; returns the engine adapter name."""
        name = self.residency._ensure(record, self.pinned)
        self.pinned.add(name)
        return name


class AdapterResidency:
    def __init__(self, engine: Engine, *, read: Callable[[TenantRecord], AdapterBytes], max_resident: int,
                 idle_ttl_s: float, negative_cache_s: float, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if max_resident < 1:
            raise ValueError("max_resident_adapters must be at least 1")
        self._engine = engine
        self._read = read  # the record's adapter bytes, sha256-checked (AdapterStore.read); loaded as they are
        self.max_resident = max_resident
        self.idle_ttl_s = idle_ttl_s
        self.negative_cache_s = negative_cache_s
        self._clock = clock
        self._wall = wall_clock
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()
        self._quarantine: dict[str, _Quarantine] = {}
        self.counters = ResidencyCounters()

    @contextlib.contextmanager
    def batch(self) -> Iterator[BatchLease]:
        """Pin adapters for one batch; they become evictable again when it ends."""
        lease = BatchLease(self)
        try:
            yield lease
        finally:
            lease.pinned.clear()

    def resident_ids(self) -> set[str]:
        return set(self._resident)

    def evict_idle(self) -> list[str]:
        """Drop adapters unused for longer than idle_ttl_s (never a pinned one: none are pinned between batches)."""
        if self.idle_ttl_s <= 0:
            return []
        now = self._clock()
        idle = [a.adapter_id for a in self._resident.values() if now - a.last_used > self.idle_ttl_s]
        for name in idle:
            self._evict(name)
            self.counters.evictions_idle += 1
        return idle

    def snapshot(self) -> dict:
        """Describe-API view; `last_used`/`loaded_at` are wall-clock epoch seconds."""
        now_mono, now_wall = self._clock(), self._wall()
        return {
            "max_resident": self.max_resident,
            "idle_ttl_s": self.idle_ttl_s,
            "resident": [
                {"adapter": a.adapter_id, "tenant": a.tenant, "version": a.version,
                 "loaded_at": round(now_wall - (now_mono - a.loaded_at), 3),
                 "last_used": round(now_wall - (now_mono - a.last_used), 3),
                 "hits": a.hits, "load_ms": round(a.load_ms, 3), "bytes": a.nbytes}
                for a in reversed(self._resident.values())  # most recently used first
            ],
            "quarantined": {k: {"reason": q.reason, "seconds_left": round(q.until - now_mono, 1)}
                            for k, q in self._quarantine.items() if q.until > now_mono},
            "counters": vars(self.counters).copy(),
        }

    # -- internals (worker thread) -------------------------------------------------

    def _ensure(self, record: TenantRecord, pinned: set[str]) -> str:
        name = record.adapter_id
        now = self._clock()
        hit = self._resident.get(name)
        if hit is not None:
            self._resident.move_to_end(name)
            hit.last_used = now
            hit.hits += 1
            self.counters.hits += 1
            return name
        quarantined = self._quarantine.get(name)
        if quarantined is not None:
            if quarantined.until > now:
                self.counters.quarantine_hits += 1
                raise AdapterLoadFailed(name, f"quarantined after a failed load: {quarantined.reason}")
            del self._quarantine[name]
        self._drop_stale_versions(record, pinned)
        if len(pinned) >= self.max_resident:
            # The service's wave planning never pins more adapters than fit; a caller that did
            # would have every slot in use by its own batch.
            raise RuntimeError(f"a batch pinned {len(pinned)} adapters and asked for {name}; "
                               f"at most {self.max_resident} can be resident")
        loaded = self._load(record, now)  # into the spare slot: a failed load costs no resident adapter
        loaded.hits = 1  # the request that loaded it is its first use
        self.counters.hits += 1
        self._resident[name] = loaded
        while len(self._resident) > self.max_resident:
            victim = self._evictable(pinned | {name})
            if victim is None:  # unreachable: fewer than max_resident are pinned (checked above)
                break
            self._evict(victim)
            self.counters.evictions_lru += 1
        return name

    def _load(self, record: TenantRecord, now: float) -> ResidentAdapter:
        name = record.adapter_id
        try:
            info = self._engine.load_adapter(self._read(record), name)
        except Exception as exc:  # any failure quarantines: never retry a broken adapter per request
            reason = f"{type(exc).__name__}: {exc}"
            self._quarantine[name] = _Quarantine(reason, now + self.negative_cache_s)
            self.counters.load_failures += 1
            log.warning("adapter %s failed to load, quarantined for %ss: %s", name, self.negative_cache_s, reason)
            raise AdapterLoadFailed(name, reason) from exc
        self.counters.loads += 1
        log.info("adapter %s loaded in %.1f ms (%d bytes)", name, info.load_ms, info.nbytes)
        return ResidentAdapter(name, record.tenant_id, record.version, now, now, info.load_ms, info.nbytes)

    def _drop_stale_versions(self, record: TenantRecord, pinned: set[str]) -> None:
        """A newer (or rolled-back) version replaces the tenant's resident one."""
        stale = [a.adapter_id for a in self._resident.values()
                 if a.tenant == record.tenant_id and a.adapter_id != record.adapter_id
                 and a.adapter_id not in pinned]
        for name in stale:
            self._evict(name)
            self.counters.evictions_stale += 1

    def _evictable(self, pinned: set[str]) -> str | None:
        for name in self._resident:  # oldest first
            if name not in pinned:
                return name
        return None

    def _evict(self, name: str) -> None:
        self._resident.pop(name, None)
        self._engine.delete_adapter(name)
        log.info("adapter %s evicted", name)
