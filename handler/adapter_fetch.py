"""Adapter reads off the scheduler thread: the store's read (a file or object-store read and the
sha256 over every byte) and, for an engine that makes slot images, the adapter's image in the
pool's layout, on a thread of its own, so the rows already running keep stepping while an adapter
no tier holds is fetched.

Why: with the continuous scheduler one thread runs every row's steps and every adapter load; a
load from the store costs tens of milliseconds (bench/RESULTS.md), during which no row got a token.
What stays on the scheduler thread is the copy into a device slot (the engine is single-threaded):
with an image (`prepare`, the engine's `image_from_bytes`: checks, dtype conversion and B's
transpose done here) that is one host-to-device copy and contiguous device copies, where a load
from the bytes would parse, stage and convert them there and then copy the slot back out for the
host tier. The residency asks `take` for a finished read, or `start`s one and keeps the row
waiting (`residency.AdapterFetching`); the scheduler retries the row at its next iteration.

What a read returns is copied into memory of its own before the next read starts (the store reuses
one buffer for every read), and a failed read is handed back as its exception (the residency
quarantines the adapter as for a failed synchronous load). Results nobody takes (the row was
cancelled meanwhile) are dropped oldest first beyond `max_ready`.

Concurrency: `start`, `take`, `pending` and `stop` are called by the owner thread (the scheduler's);
the fetch thread only calls `read` and `prepare` (which must be safe on any thread: the engine's
`image_from_bytes` touches no slot) and fills `_done` under `_lock`. `read_now` is a synchronous read
for the owner thread (pins, prefetch) under the same read lock, so the store's buffer is never read
into by two threads at once.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from loraplex_common.adapter_format import AdapterBytes
from tenant_registry.schema import TenantRecord

from .engine.multilora.slot_loader import SlotImage

log = logging.getLogger(__name__)

MAX_READY = 16  # finished reads kept for rows that have not come back for them


@dataclass(frozen=True)
class FetchedAdapter:
    adapter: AdapterBytes  # its own copy of the verified bytes
    read_ms: float  # how long the store read (the copy out of its buffer and the image included) took on the fetch thread
    image: SlotImage | None = None  # the engine's slot image of it (`prepare`), what the owner thread loads


def own_copy(got: AdapterBytes) -> AdapterBytes:
    """`got` with its weights in bytes of their own (out of the store's reused read buffer)."""
    return AdapterBytes.of(got.config, bytes(got.weights), got.name)


class AdapterFetcher:
    def __init__(self, read: Callable[[TenantRecord], AdapterBytes], *,
                 prepare: Callable[[AdapterBytes], SlotImage] | None = None, max_ready: int = MAX_READY) -> None:
        self._read = read
        self._prepare = prepare  # bytes -> the engine's slot image, on the fetch thread (None: bytes only)
        self.max_ready = max_ready
        self._read_lock = threading.Lock()  # one read into the store's buffer at a time
        self._lock = threading.Lock()  # _done and _pending
        self._pending: set[str] = set()
        self._done: OrderedDict[str, FetchedAdapter | Exception] = OrderedDict()
        self._queue: queue.SimpleQueue[TenantRecord | None] = queue.SimpleQueue()
        self.fetches = 0  # reads started
        self.dropped = 0  # finished reads nobody took
        self._thread = threading.Thread(target=self._run, name="loraplex-adapter-fetch", daemon=True)
        self._thread.start()

    # -- owner thread -----------------------------------------------------------
    def start(self, record: TenantRecord) -> None:
        """Read `record`'s adapter in the background (no-op while it is being read or waits in `_done`)."""
        name = record.adapter_id
        with self._lock:
            if name in self._pending or name in self._done:
                return
            self._pending.add(name)
        self.fetches += 1
        self._queue.put(record)

    def pending(self, adapter_id: str) -> bool:
        """Being read, or read and not taken yet."""
        with self._lock:
            return adapter_id in self._pending or adapter_id in self._done

    def take(self, adapter_id: str) -> FetchedAdapter | Exception | None:
        """The finished read or its exception, removed; None while it is still being read or was
        never started."""
        with self._lock:
            return self._done.pop(adapter_id, None)

    def read_now(self, record: TenantRecord) -> AdapterBytes:
        """A synchronous read on the calling thread: its own copy of the bytes, as the fetch thread's
        (a view of the store's reused buffer would change under the caller as soon as the fetch
        thread's next read takes the lock)."""
        with self._read_lock:
            return own_copy(self._read(record))

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(5.0)

    def describe(self) -> dict:
        with self._lock:
            return {"fetching": sorted(self._pending), "ready": list(self._done), "fetches": self.fetches,
                    "dropped": self.dropped}

    # -- the fetch thread -------------------------------------------------------
    def _run(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            result: FetchedAdapter | Exception
            t0 = time.perf_counter()
            try:
                with self._read_lock:
                    own = own_copy(self._read(record))  # out of the reused buffer
                image = self._prepare(own) if self._prepare is not None else None  # a refusal raises here
                result = FetchedAdapter(own, (time.perf_counter() - t0) * 1000.0, image)
            except Exception as exc:  # handed back: the residency quarantines as for a failed load
                result = exc
            with self._lock:
                self._pending.discard(record.adapter_id)
                self._done[record.adapter_id] = result
                while len(self._done) > self.max_ready:
                    dropped, _ = self._done.popitem(last=False)
                    self.dropped += 1
                    log.info("adapter read of %s dropped: no row came back for it", dropped)
