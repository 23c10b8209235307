"""Which tenant adapters are resident in this worker's engine, and for how long.

Model: Ray Serve's multiplex LRU (an OrderedDict, hit = move to end, evict =
pop the oldest) with three additions a multi-tenant server needs:
- adapters held by rows being served are never evicted: each row holds its
  adapter (`hold`/`release`, a count per adapter) from before its first step to
  after its last. The static path holds a batch's adapters for one engine call
  (`batch()`); the per-step scheduler holds each row's while it runs, so a row
  keeps the version it started with when a newer one is published (the old one
  leaves its slot when its last row releases it). When every slot is held, a
  load raises `AllSlotsHeld` and the scheduler keeps the row waiting; with the
  scheduler's `AdapterFetcher`, an adapter in neither tier is read from the
  store on the fetch thread meanwhile (`AdapterFetching`: the row waits, the
  others keep stepping) and only its copy into a slot runs here;
- a failed verify/load is quarantined for `negative_cache_s` so a broken
  adapter is not re-read on every request;
- the new adapter is loaded *before* an old one is evicted (the engine is
  built with one spare slot), so a load that fails never costs a good resident.
Idle adapters (unused for `idle_ttl_s`) are evicted at the start of each batch
and on describe; there is no timer thread because only the worker thread may
touch the engine.

Beneath the slots, a host-memory tier (`host_tier.HostTier`) keeps recently loaded
adapters, so a load is: device slots (hit) → host tier (no store read, no hash: the
bytes were checked when they entered) → the store (`read`; then the engine's slot
image of the adapter goes into the tier where the engine makes them, a copy of the
bytes otherwise, and an adapter the tier held as bytes is replaced by its image
once it is loaded from them).

Pinned tenants (`tenantctl pin`, the registry's pinned set, the first
`max_pinned` of it) have their current adapter kept in both tiers: LRU and idle
eviction skip it, and `sync` loads it back whenever it is not resident. The
one exception: a wave that needs every slot for its own adapters evicts a
pinned one (it stays in the host tier and `sync` reloads it before the next
batch); a worker therefore keeps at most `max_resident − 1` pinned in its slots,
so there is always a slot for other tenants. Registry events (pin/unpin,
new versions, removals) reach the residency through `RegistryChanges` and are
applied by `sync` at the start of each batch and on describe.

Requests served per tenant are counted here and added to the registry's use
counts (`record_uses`) at most every `uses_flush_s`, in one round trip; the
`prefetch_top_n` most used are loaded at worker start (`prefetch`).

Concurrency: every method is called from the one thread that owns the engine
(static: the TorchServe worker's request thread, which TorchServe calls
sequentially; continuous: the scheduler thread), except
`RegistryChanges.on_event`, called from the registry subscriber thread.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

from loraplex_common.adapter_format import AdapterBytes
from tenant_registry.ids import DEFAULT_TASK, adapter_line, line_of
from tenant_registry.errors import RegistryError
from tenant_registry.schema import TenantRecord

from .engine.api import Engine
from .adapter_fetch import AdapterFetcher, FetchedAdapter
from .engine.multilora.slot_loader import LoadsSlotImages, SlotImage
from .errors import AdapterLoadFailed
from .host_tier import HostTier
from .metrics import WorkerMetrics

USES_FLUSH_S = 5.0  # how often a worker adds its per-tenant request counts to the registry

log = logging.getLogger(__name__)


class AdapterNotReady(RuntimeError):
    """The row cannot have its adapter yet: it waits, and the scheduler tries it again later."""


class AllSlotsHeld(AdapterNotReady):
    """Every resident slot is held by rows being served: nothing can be evicted for another adapter now."""


class AdapterFetching(AdapterNotReady):
    """The adapter is being read from the store on the fetch thread (`adapter_fetch.AdapterFetcher`)."""


@dataclass
class ResidentAdapter:
    adapter_id: str
    tenant: str
    version: int
    loaded_at: float
    last_used: float
    load_ms: float  # the whole load: the read (store) or the held bytes (host tier), then the engine's copy
    nbytes: int
    source: str = "store"  # where the load took the bytes from: "host" (the host tier) or "store"
    task: str = DEFAULT_TASK  # the tenant's task (adapter line) this version belongs to
    hits: int = 0  # requests served with it since it was loaded, the loading request included


@dataclass
class ResidencyCounters:
    loads: int = 0
    hits: int = 0  # requests served with an adapter (those that loaded it included; `loads` says how many did)
    load_failures: int = 0
    quarantine_hits: int = 0
    evictions_lru: int = 0
    evictions_idle: int = 0
    evictions_stale: int = 0  # a newer version, a rollback or the tenant's removal replaced it
    evictions_pinned: int = 0  # a pinned adapter evicted because one wave needed every slot (reloaded by `sync`)
    load_thread_ms: float = 0.0  # time loads held the owner thread (continuous: the scheduler's, every row waiting)


@dataclass(frozen=True)
class LastAcquire:
    """How the latest request's adapter was found: already in a slot, or loaded from where."""

    adapter: str
    source: str  # "device", "host" or "store"
    load_ms: float


class RegistryChanges:
    """Registry events the residency acts on, handed from the subscriber thread (`on_event`) to
    the worker thread (`take`, from `AdapterResidency.sync`). A lock guards the fields.

    Keys of `_versions` are adapter lines (ids.adapter_line: "acme", "acme:summarize"): a new
    version or a rollback of one task replaces only that task's resident versions. A tenant-wide
    change (the whole tenant removed, or re-imported) is keyed by the tenant in `_tenants`: all
    its tasks' adapters go."""

    _PIN_KINDS = ("pin", "unpin", "resync", "import", "onboard", "rollback", "remove", "enable", "disable")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pins_dirty = True  # the pinned set is fetched on the first sync
        self._versions: dict[str, str | None] = {}  # line -> the adapter id it serves now (None: removed)
        self._tenants: set[str] = set()  # tenants removed or re-imported as a whole

    def on_event(self, event: dict) -> None:
        kind, tenant, version, task = event.get("kind"), event.get("tenant"), event.get("version"), event.get("task")
        with self._lock:
            if kind in self._PIN_KINDS:
                self._pins_dirty = True  # a pinned tenant's current adapter may have changed too
            if not isinstance(tenant, str):
                return
            try:
                line = adapter_line(tenant, task if isinstance(task, str) else DEFAULT_TASK)
            except RegistryError:  # an event naming an invalid id or task: nothing of ours
                return
            if kind == "remove" and task is None or kind == "import":
                self._tenants.add(tenant)
                self._versions = {k: v for k, v in self._versions.items() if k != tenant and not k.startswith(tenant + ":")}
            elif kind == "remove":
                self._versions[line] = None
            elif kind in ("onboard", "rollback") and isinstance(version, int):
                self._versions[line] = f"{line}@v{version}"

    def mark_pins_dirty(self) -> None:
        with self._lock:
            self._pins_dirty = True

    def take(self) -> tuple[bool, dict[str, str | None], set[str]]:
        with self._lock:
            out = self._pins_dirty, self._versions, self._tenants
            self._pins_dirty, self._versions, self._tenants = False, {}, set()
        return out


@dataclass
class _Quarantine:
    reason: str
    until: float


@dataclass
class BatchLease:
    """Adapters held for the batch in flight (one hold per row; all released when it ends)."""

    residency: "AdapterResidency"
    held: list[str] = field(default_factory=list)

    def acquire(self, record: TenantRecord) -> str:
        """Make the record's adapter resident and hold it; returns the engine adapter name."""
        name = self.residency.hold(record)
        self.held.append(name)
        return name


class AdapterResidency:
    """`host_tier`: the tier beneath the slots (None or budget 0: none). `fetch_pinned`: the pinned
    tenants' current records, first pinned first (the registry; may raise). `record_uses`: adds
    {tenant: requests} to the registry's use counts (may raise). Loads read the store on the
    calling thread unless `read_in_background` gave the residency a fetcher."""

    def __init__(self, engine: Engine, *, read: Callable[[TenantRecord], AdapterBytes], max_resident: int,
                 idle_ttl_s: float, negative_cache_s: float, host_tier: HostTier | None = None,
                 fetch_pinned: Callable[[], Sequence[TenantRecord]] | None = None, max_pinned: int = 0,
                 record_uses: Callable[[dict[str, int]], None] | None = None, uses_flush_s: float = USES_FLUSH_S,
                 metrics: WorkerMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        if max_resident < 1:
            raise ValueError("max_resident must be at least 1 (num_slots - 2 resident adapters)")
        self._engine = engine
        self._read = read  # the record's adapter bytes, sha256-checked (AdapterStore.read); loaded as they are
        self._fetcher: AdapterFetcher | None = None  # `read_in_background`
        self.max_resident = max_resident
        self.idle_ttl_s = idle_ttl_s
        self.negative_cache_s = negative_cache_s
        self.host_tier = host_tier if host_tier is not None else HostTier(0, pin=False)
        self._fetch_pinned = fetch_pinned
        self.max_pinned = max(0, max_pinned)
        self._record_uses = record_uses
        self.uses_flush_s = uses_flush_s
        self._clock = clock
        self._wall = wall_clock
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()
        self._quarantine: dict[str, _Quarantine] = {}
        self._pinned: dict[str, TenantRecord] = {}  # adapter id -> record: kept in both tiers
        self._uses: Counter[str] = Counter()  # requests per tenant not yet added to the registry
        self._uses_flushed_at = clock()
        self._holds: Counter[str] = Counter()  # adapter id -> rows holding it (never evicted while > 0)
        self._stale_held: set[str] = set()  # replaced while held: evicted when the last hold goes
        # Adapters rows waiting to run will need (the continuous scheduler's); an LRU victim is taken
        # among the others first. Asked only when a victim is chosen.
        self.wanted: Callable[[], set[str]] = set
        self.changes = RegistryChanges()
        self.last_acquire: LastAcquire | None = None
        self.counters = ResidencyCounters()
        self.metrics = metrics if metrics is not None else WorkerMetrics()  # loads, evictions (worker thread)

    def read_in_background(self) -> AdapterFetcher:
        """From now on store reads for loads run on a fetch thread (the continuous scheduler calls
        this before it starts; only it retries a row on `AdapterFetching`); returns the fetcher (its
        owner stops it). The fetcher reads through `_read`; the reads left here (pins, prefetch)
        take its read lock."""
        prepare = self._engine.image_from_bytes if isinstance(self._engine, LoadsSlotImages) else None
        self._fetcher = AdapterFetcher(lambda record: self._read(record), prepare=prepare)
        return self._fetcher

    def _read_now(self, record: TenantRecord) -> AdapterBytes:
        """A store read on this thread (under the fetcher's read lock when there is one)."""
        return self._fetcher.read_now(record) if self._fetcher is not None else self._read(record)

    @contextlib.contextmanager
    def batch(self) -> Iterator[BatchLease]:
        """Hold adapters for one batch; they become evictable again when it ends."""
        lease = BatchLease(self)
        try:
            yield lease
        finally:
            for name in lease.held:
                self.release(name)
            lease.held.clear()

    def hold(self, record: TenantRecord) -> str:
        """Make the record's adapter resident (loading it, evicting an unheld one) and hold it for
        one row; returns the engine adapter name. AdapterLoadFailed (quarantined, or the load
        failed), AllSlotsHeld (every slot is held by other rows: try again after a release)."""
        name = self._ensure(record)
        self._holds[name] += 1
        return name

    def release(self, name: str) -> None:
        """One row is done with `name` (its idle time starts now). The last release of a replaced
        version evicts it."""
        resident = self._resident.get(name)
        if resident is not None:
            resident.last_used = self._clock()
        if self._holds[name] <= 1:
            self._holds.pop(name, None)
            if name in self._stale_held:
                self._stale_held.discard(name)
                self._evict(name, "stale")
        else:
            self._holds[name] -= 1

    def held_ids(self) -> dict[str, int]:
        """Adapter id -> rows holding it."""
        return dict(self._holds)

    def resident_ids(self) -> set[str]:
        return set(self._resident)

    def pinned_ids(self) -> set[str]:
        return set(self._pinned)

    def evict_idle(self) -> list[str]:
        """Apply registry changes (`sync`), then drop adapters unused for longer than idle_ttl_s
        (never a pinned tenant's, never one a row holds)."""
        self.sync()
        if self.idle_ttl_s <= 0:
            return []
        now = self._clock()
        idle = [a.adapter_id for a in self._resident.values()
                if now - a.last_used > self.idle_ttl_s and a.adapter_id not in self._pinned
                and a.adapter_id not in self._holds]
        for name in idle:
            self._evict(name, "idle")
        return idle

    def sync(self) -> None:
        """Between batches or steps (engine thread): apply the registry's changes (a tenant's other
        versions leave both tiers, a removed tenant's adapters leave both; one a row holds leaves
        its slot at its last release), refresh the pinned set when it may have changed, load
        pinned adapters that are not resident, add the use counts."""
        pins_dirty, versions, tenants = self.changes.take()
        for tenant in tenants:  # removed or re-imported as a whole: every task's adapters go
            self.host_tier.drop_tenant(tenant)
            for name in [a.adapter_id for a in self._resident.values() if a.tenant == tenant]:
                self._retire(name)
        for line, current in versions.items():  # one task moved (or went): its other versions go
            tenant = line.partition(":")[0]
            self.host_tier.drop_tenant(tenant, keep=current, line=line)
            self._stale_held.discard(current)
            for name in [a.adapter_id for a in self._resident.values()
                         if line_of(a.adapter_id) == line and a.adapter_id != current]:
                self._retire(name)
        if pins_dirty and self._fetch_pinned is not None:
            try:
                records = list(self._fetch_pinned())
            except Exception as exc:  # Redis away: keep the pins we know, try again next time
                self.changes.mark_pins_dirty()
                log.warning("could not read the pinned tenants (%s: %s); keeping %s",
                            type(exc).__name__, exc, sorted(self._pinned) or "none")
            else:
                self._set_pins(records)
        self._restore_pins()
        self.flush_uses()

    def flush_uses(self, force: bool = False) -> None:
        """Add the requests counted since the last flush to the registry (at most every uses_flush_s)."""
        now = self._clock()
        if not self._uses or self._record_uses is None or (not force and now - self._uses_flushed_at < self.uses_flush_s):
            return
        self._uses_flushed_at = now
        try:
            self._record_uses(dict(self._uses))
        except Exception as exc:  # kept and added next time: one entry per tenant at most
            log.warning("could not add use counts to the registry: %s: %s", type(exc).__name__, exc)
            return
        self._uses.clear()

    def prefetch(self, records: Iterable[TenantRecord]) -> list[str]:
        """At worker start: load these adapters into the free slots (never evicting one), then
        the rest into the host tier only. Failures are logged and quarantined like any load;
        returns the adapter ids now held in a slot or the tier."""
        done: list[str] = []
        for record in dict((r.adapter_id, r) for r in records).values():
            name = record.adapter_id
            if name in self._resident or name in self.host_tier:
                done.append(name)
                continue
            if not record.enabled or self._quarantined(name, self._clock()):
                continue
            try:
                if len(self._resident) < self.max_resident:
                    self._resident[name] = self._load(record, self._clock())
                elif self.host_tier.enabled:
                    self._read_into_tier(record)
                else:
                    continue
            except AdapterLoadFailed:
                continue  # logged and quarantined by _load / _read_into_tier
            done.append(name)
        log.info("prefetched %d adapter(s): %s", len(done), ", ".join(done) or "none")
        return done

    def snapshot(self) -> dict:
        """Describe-API view; `last_used`/`loaded_at` are wall-clock epoch seconds."""
        now_mono, now_wall = self._clock(), self._wall()
        last = self.last_acquire
        return {
            "max_resident": self.max_resident,
            "idle_ttl_s": self.idle_ttl_s,
            "resident": [
                {"adapter": a.adapter_id, "tenant": a.tenant, "version": a.version,
                 "loaded_at": round(now_wall - (now_mono - a.loaded_at), 3),
                 "last_used": round(now_wall - (now_mono - a.last_used), 3),
                 "hits": a.hits, "load_ms": round(a.load_ms, 3), "source": a.source, "bytes": a.nbytes,
                 "pinned": a.adapter_id in self._pinned}
                for a in reversed(self._resident.values())  # most recently used first
            ],
            "pinned": list(self._pinned),
            "held": dict(self._holds),
            "host_tier": self.host_tier.snapshot(),
            "last_acquire": None if last is None else {"adapter": last.adapter, "source": last.source,
                                                       "load_ms": round(last.load_ms, 3)},
            "quarantined": {k: {"reason": q.reason, "seconds_left": round(q.until - now_mono, 1)}
                            for k, q in self._quarantine.items() if q.until > now_mono},
            "counters": {**{k: round(v, 1) if isinstance(v, float) else v for k, v in vars(self.counters).items()},
                         **vars(self.host_tier.counters)},
            # store reads on the fetch thread (continuous scheduler): under way, read and not taken yet
            "fetch": self._fetcher.describe() if self._fetcher is not None else None,
        }

    # -- internals (worker thread) -------------------------------------------------

    def _ensure(self, record: TenantRecord) -> str:
        name = record.adapter_id
        now = self._clock()
        held = set(self._holds)
        hit = self._resident.get(name)
        if hit is None and name not in held and len(held) >= self.max_resident:
            # Static: the wave planning never holds more adapters than fit. Continuous: the
            # scheduler keeps the row waiting until a running row releases a slot.
            raise AllSlotsHeld(f"{len(held)} adapters are held by running rows and {name} is not resident; "
                               f"at most {self.max_resident} can be resident")
        quarantined = None if hit is not None else self._quarantined(name, now)
        prepared = self._prepared(record) if hit is None and quarantined is None else None
        self._uses[record.tenant_id] += 1
        self._stale_held.discard(name)
        if hit is not None:
            self._resident.move_to_end(name)
            hit.last_used = now
            hit.hits += 1
            self.counters.hits += 1
            self.last_acquire = LastAcquire(name, "device", 0.0)
            return name
        if quarantined is not None:
            self.counters.quarantine_hits += 1
            raise AdapterLoadFailed(name, f"quarantined after a failed load: {quarantined.reason}")
        self._drop_stale_versions(record)
        loaded = self._load(record, now, prepared)  # into the spare slot: a failed load costs no resident adapter
        loaded.hits = 1  # the request that loaded it is its first use
        self.counters.hits += 1
        self._resident[name] = loaded
        self.last_acquire = LastAcquire(name, loaded.source, loaded.load_ms)
        self._evict_over_capacity({name})
        return name

    def _evict_over_capacity(self, keep: set[str]) -> None:
        keep = keep | set(self._holds)
        while len(self._resident) > self.max_resident:
            victim = self._evictable(keep)
            if victim is None:  # unreachable: fewer than max_resident are held (checked by _ensure, _restore_pins)
                break
            self._evict(victim, "pinned" if victim in self._pinned else "lru")
            if victim in self._pinned:
                log.info("pinned adapter %s evicted: one wave needed every slot (it stays in the host tier)", victim)

    def _quarantined(self, name: str, now: float) -> _Quarantine | None:
        quarantined = self._quarantine.get(name)
        if quarantined is not None and quarantined.until <= now:
            del self._quarantine[name]
            return None
        return quarantined

    def _prepared(self, record: TenantRecord) -> FetchedAdapter | Exception | None:
        """With a fetcher, for an adapter in neither tier: its finished background read (the bytes,
        or the read's exception), else start the read (a host-tier miss, counted once) and raise
        `AdapterFetching`. None: `_load` takes it from the host tier, or reads it itself (no fetcher)."""
        name = record.adapter_id
        if self._fetcher is None or name in self.host_tier:
            return None
        got = self._fetcher.take(name)
        if got is not None:
            return got
        if not self._fetcher.pending(name):
            self.host_tier.get(name)  # the miss that sends it to the store
            self._fetcher.start(record)
        raise AdapterFetching(f"{name} is being read from the adapter store")

    def _load(self, record: TenantRecord, now: float, prepared: FetchedAdapter | Exception | None = None
              ) -> ResidentAdapter:
        """Into a free slot: `prepared` (the fetch thread's read of the store, or its failure), else
        the host tier's image or bytes when it holds them, else the store's (read here); what came
        from the store then enters the tier. Any failure quarantines the adapter."""
        name = record.adapter_id
        t0 = time.perf_counter()
        held = self.host_tier.get(name) if prepared is None else None
        image = prepared.image if isinstance(prepared, FetchedAdapter) else None  # made on the fetch thread
        try:
            if isinstance(prepared, Exception):
                raise prepared
            if isinstance(held, SlotImage):
                info = self._engine.load_image(held, name)
            elif image is not None:
                info = self._engine.load_image(image, name)
            else:
                adapter = prepared.adapter if prepared is not None else held if held is not None else self._read_now(record)
                info = self._engine.load_adapter(adapter, name)
        except Exception as exc:  # any failure quarantines: never retry a broken adapter per request
            raise self._quarantine_failure(name, now, exc) from exc
        if not isinstance(held, SlotImage):  # after the engine accepted them: only loadable adapters enter
            self._hold(record, None if image is not None else adapter, loaded=True, image=image)
        here_ms = (time.perf_counter() - t0) * 1000.0  # what the load held this thread for
        self.counters.load_thread_ms += here_ms
        ms = here_ms + (prepared.read_ms if isinstance(prepared, FetchedAdapter) else 0.0)  # + its background read
        source = "host" if held is not None else "store"
        self.counters.loads += 1
        self.metrics.loaded(record.tenant_id, record.version, source, ms / 1000.0, task=record.task)
        log.info("adapter %s loaded from the %s in %.1f ms (%.1f ms of it on this thread; %d bytes)", name, source,
                 ms, here_ms, info.nbytes)
        return ResidentAdapter(name, record.tenant_id, record.version, now, now, ms, info.nbytes, source, task=record.task)

    def _read_into_tier(self, record: TenantRecord) -> None:
        """The store's verified bytes into the host tier only (prefetch beyond the free slots)."""
        try:
            adapter = self._read_now(record)
        except Exception as exc:
            raise self._quarantine_failure(record.adapter_id, self._clock(), exc) from exc
        self._hold(record, adapter, loaded=False)

    def _hold(self, record: TenantRecord, adapter: AdapterBytes | None, *, loaded: bool,
              image: SlotImage | None = None) -> None:
        """Into the host tier: `image` (the fetch thread's, already loaded), else the engine's slot
        image when the adapter is `loaded` in an engine that makes them (it replaces held bytes),
        else a copy of its verified bytes."""
        if not self.host_tier.enabled:
            return
        try:
            if image is not None:
                self.host_tier.put_image(record.tenant_id, record.adapter_id, image)
            elif loaded and isinstance(self._engine, LoadsSlotImages):
                self.host_tier.put_image(record.tenant_id, record.adapter_id,
                                         self._engine.slot_image(record.adapter_id))
            else:
                self.host_tier.put(record.tenant_id, record.adapter_id, adapter)
        except Exception:  # e.g. no pinned memory left: the adapter is served, only not kept
            log.exception("host tier could not hold %s", record.adapter_id)

    def _quarantine_failure(self, name: str, now: float, exc: Exception) -> AdapterLoadFailed:
        reason = f"{type(exc).__name__}: {exc}"
        self._quarantine[name] = _Quarantine(reason, now + self.negative_cache_s)
        self.counters.load_failures += 1
        log.warning("adapter %s failed to load, quarantined for %ss: %s", name, self.negative_cache_s, reason)
        return AdapterLoadFailed(name, reason)

    def _set_pins(self, records: Sequence[TenantRecord]) -> None:
        """The first `max_pinned` enabled pinned tenants' current adapters are kept (the registry
        refuses more pins; a worker keeps no more whatever it finds there)."""
        kept = [r for r in records if r.enabled][:self.max_pinned]
        if len(kept) < len([r for r in records if r.enabled]):
            log.warning("registry has more pinned tenants than max_pinned_adapters=%d; keeping %s",
                        self.max_pinned, [r.tenant_id for r in kept])
        self._pinned = {r.adapter_id: r for r in kept}
        self.host_tier.protect(set(self._pinned))

    def _restore_pins(self) -> None:
        """Pinned adapters that are not resident are loaded (between batches, never evicting
        another pinned one); at most max_resident − 1 are kept in the slots."""
        now = self._clock()
        in_slots = [n for n in self._pinned if n in self._resident]
        for name, record in self._pinned.items():
            if name in self._resident:
                continue
            if len(in_slots) >= self.max_resident - 1:
                break
            if self._quarantined(name, now) is not None:
                continue
            if len(self._resident) >= self.max_resident and self._evictable({name, *self._holds}) is None:
                break  # every other slot is held by running rows: loaded after they release
            self._drop_stale_versions(record)
            try:
                self._resident[name] = self._load(record, now)
            except AdapterLoadFailed:
                continue
            in_slots.append(name)
            self._evict_over_capacity({name})

    def _drop_stale_versions(self, record: TenantRecord) -> None:
        """A newer (or rolled-back) version replaces the resident one of the same task (not a pinned
        tenant's current one; one a row holds leaves at its last release). Other tasks stay."""
        line = line_of(record.adapter_id)
        stale = [a.adapter_id for a in self._resident.values()
                 if line_of(a.adapter_id) == line and a.adapter_id != record.adapter_id
                 and a.adapter_id not in self._pinned]
        for name in stale:
            self._retire(name)

    def _retire(self, name: str) -> None:
        """A replaced version leaves its slot now, or at its last release when a row holds it."""
        if name in self._holds:
            self._stale_held.add(name)
        else:
            self._evict(name, "stale")

    def _evictable(self, keep: set[str]) -> str | None:
        """The least recently used adapter not in `keep` (held by rows): one no waiting row wants
        first, then a wanted one, a pinned tenant's last."""
        candidates = [name for name in self._resident if name not in keep]  # oldest first
        if not candidates:
            return None
        wanted = self.wanted() if len(candidates) > 1 else set()
        rank = lambda name: (name in self._pinned, name in wanted)  # noqa: E731
        return min(candidates, key=rank)  # min keeps the first (least recently used) of equal rank

    def _evict(self, name: str, reason: str) -> None:
        """Out of its slot, counted under `evictions_<reason>` (lru | idle | stale | pinned)."""
        self._engine.delete_adapter(name)  # first: an engine that refuses (rows still use it) changes nothing here
        counter = f"evictions_{reason}"
        setattr(self.counters, counter, getattr(self.counters, counter) + 1)
        gone = self._resident.pop(name, None)
        if gone is not None:
            self.metrics.evicted(gone.tenant, gone.version, reason, task=gone.task)
        log.info("adapter %s evicted", name)
