"""The host-memory adapter tier: verified adapters kept in host memory beneath the device slots.

Why: an adapter evicted from the engine's slots comes back often (Zipf-popular tenants on a
worker with few slots). Reading it again from the store means a file (or object-store) read and a
sha256 over every byte. An entry is one of two forms:

- a slot image (`slot_loader.SlotImage`, `put_image`): the adapter as the engine's slot held it,
  in the pool's layout and dtype, from an engine that makes them (the multilora engine): made
  from the verified bytes on the adapter fetch thread (`image_from_bytes`), or taken from the
  slot right after a load from bytes (`slot_image`). A reload (`MultiLoraEngine.load_image`) is then contiguous
  copies into the slot, no parse, no dtype conversion, no transpose (on a GPU one host-to-device
  copy: the engine allocates images in page-locked memory there);
- the verified bytes (`put`): for an engine without images (PEFT's) and for adapters prefetched
  into the tier without a slot; the engine reads them in place (`AdapterBytes.buffer`), and the
  residency replaces them by an image once they are loaded.

Either entered the tier only after the store checked the bytes' sha256 and the engine accepted
them, and an adapter id (`<tenant>@v<N>`) names immutable weights, so a held entry is never
stale: only the registry's removal (and a tenant moving to another version, like the device
slots do) drops entries (`drop_tenant`).

An LRU by bytes: `budget_bytes` (`host_tier_mb`; 0 = off, nothing is held) bounds the held
memory (an image counts its own bytes: the adapter at its true rank in the pool's dtype); the
least recently used unprotected entries are dropped to make room. Protected entries (`protect`:
the current adapters of pinned tenants) are never dropped; an adapter that does not fit beside
them is not held (it is served from the store as before).

Bytes are copied here because the store's read returns weights in a buffer its next read reuses
(`ReadBuffer`). On a CUDA worker the copy lives in pinned (page-locked) host memory
(`_host_bytes`, the one place the tier allocates), so the transfer to the device reads it
directly, never pageable memory; on a CPU, plain memory.

Concurrency: owned by the worker's request thread (the residency calls it); no locks.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from tenant_registry.ids import line_of
from loraplex_common.adapter_format import AdapterBytes

from .engine.multilora.slot_loader import SlotImage

log = logging.getLogger(__name__)


@dataclass
class HostTierCounters:
    host_hits: int = 0  # loads served from the tier (no store read)
    host_misses: int = 0  # loads the tier could not serve (read from the store)
    host_evictions: int = 0  # entries dropped to make room (LRU by bytes)
    host_bytes: int = 0  # bytes held now (images and copies of weights)


@dataclass
class _Held:
    tenant: str
    adapter: AdapterBytes | SlotImage
    nbytes: int


def _host_bytes(nbytes: int, pin: bool) -> torch.Tensor:
    """The tier's one allocation: `nbytes` of host memory, page-locked when `pin` (a CUDA worker)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


class HostTier:
    def __init__(self, budget_bytes: int, *, pin: bool) -> None:
        if budget_bytes < 0:
            raise ValueError("host_tier_mb must be >= 0")
        self.budget_bytes = int(budget_bytes)
        self.pin = pin
        self._held: OrderedDict[str, _Held] = OrderedDict()  # least recently used first
        self._protected: set[str] = set()
        self.counters = HostTierCounters()

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._held

    def get(self, adapter_id: str) -> AdapterBytes | SlotImage | None:
        """The held image or bytes of `adapter_id` (now the most recently used), or None (counted as a miss)."""
        if not self.enabled:
            return None
        held = self._held.get(adapter_id)
        if held is None:
            self.counters.host_misses += 1
            return None
        self._held.move_to_end(adapter_id)
        self.counters.host_hits += 1
        return held.adapter

    def put(self, tenant: str, adapter_id: str, adapter: AdapterBytes) -> bool:
        """Hold a copy of `adapter` (verified bytes: the store checked their sha256). Makes room by
        dropping least recently used unprotected entries; True if it is held afterwards."""
        if not self.enabled:
            return False
        if adapter_id in self._held:
            self._held.move_to_end(adapter_id)
            return True
        n = len(adapter.weights)
        if not self._fits(adapter_id, n):
            return False
        buf = _host_bytes(n, self.pin)
        view = memoryview(buf.numpy())
        view[:] = memoryview(adapter.weights).cast("B")
        # `buffer`: the engine reads these bytes in place (never written again; dropped only by
        # this tier, and pinned memory is not reused before a pending copy from it completes)
        self._add(adapter_id, _Held(tenant, AdapterBytes.of(bytes(adapter.config), view.toreadonly(), adapter.name,
                                                            buffer=buf), n))
        return True

    def put_image(self, tenant: str, adapter_id: str, image: SlotImage) -> bool:
        """Hold `image` (the engine's fresh copy, taken once the adapter's verified bytes were
        loaded: held as it is, never written) in place of any bytes held for `adapter_id`. Makes
        room like `put`; True if the image is held afterwards (False: what was held stays)."""
        if not self.enabled:
            return False
        old = self._held.get(adapter_id)
        if old is not None and isinstance(old.adapter, SlotImage):
            self._held.move_to_end(adapter_id)
            return True
        n = image.nbytes
        if old is not None:  # the bytes make room for their own image (and come back if it does not fit)
            self._drop(adapter_id)
        if not self._fits(adapter_id, n):
            if old is not None:
                self._add(adapter_id, old)  # it fitted before, beside what is left now
            return False
        self._add(adapter_id, _Held(tenant, image, n))
        return True

    def protect(self, adapter_ids: set[str]) -> None:
        """These entries are never dropped to make room (the pinned tenants' current adapters)."""
        self._protected = set(adapter_ids)

    def drop_tenant(self, tenant: str, keep: str | None = None, *, line: str | None = None) -> list[str]:
        """Forget the tenant's entries (all, or all but `keep`): it was removed, or serves another
        version now. With `line` (ids.adapter_line: one task of the tenant), only that task's
        entries. Returns the dropped ids."""
        gone = [a for a, h in self._held.items() if h.tenant == tenant and a != keep
                and (line is None or line_of(a) == line)]
        for adapter_id in gone:
            self._drop(adapter_id)
        return gone

    def snapshot(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "pinned_memory": self.pin,
                "adapters": [{"adapter": a, "bytes": h.nbytes, "protected": a in self._protected,
                              "form": "image" if isinstance(h.adapter, SlotImage) else "bytes"}
                             for a, h in reversed(self._held.items())]}  # most recently used first

    # -- internals -----------------------------------------------------------------

    def _fits(self, adapter_id: str, n: int) -> bool:
        """Room for `n` more bytes made (dropping LRU entries); logs when there is none."""
        if self._make_room(n):
            return True
        log.info("host tier: %s (%d bytes) does not fit in %d bytes beside the protected adapters; not held",
                 adapter_id, n, self.budget_bytes)
        return False

    def _add(self, adapter_id: str, held: _Held) -> None:
        self._held[adapter_id] = held
        self.counters.host_bytes += held.nbytes

    def _make_room(self, n: int) -> bool:
        if n > self.budget_bytes:
            return False
        protected = sum(h.nbytes for a, h in self._held.items() if a in self._protected)
        if protected + n > self.budget_bytes:
            return False
        for adapter_id in list(self._held):  # oldest first
            if self.counters.host_bytes + n <= self.budget_bytes:
                break
            if adapter_id not in self._protected:
                self._drop(adapter_id)
                self.counters.host_evictions += 1
        return self.counters.host_bytes + n <= self.budget_bytes

    def _drop(self, adapter_id: str) -> None:
        held = self._held.pop(adapter_id)
        self.counters.host_bytes -= held.nbytes
