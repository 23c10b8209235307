"""Store reads off the scheduler thread (`handler.adapter_fetch.AdapterFetcher`): a row whose
adapter is in neither tier waits while the fetch thread reads and verifies it, and the rows already
running keep getting tokens meanwhile; a failed read is quarantined like a failed load."""
from __future__ import annotations

import threading
import time

import pytest

from handler.adapter_fetch import AdapterFetcher
from handler.scheduler import Finished, TextDelta
from handler.service import RawRequest
from loraplex_common.adapter_format import AdapterBytes
from tenant_registry.errors import AdapterInvalid
from tenant_registry.store import AdapterStore

SLOW_S = 0.6


class _Reader:
    """A store stand-in whose reads reuse one buffer (like `ReadBuffer`) and wait for `gate`."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.buf = bytearray(b"w" * 64)
        self.fail: set[str] = set()

    def read(self, record) -> AdapterBytes:
        self.gate.wait(10)
        if record.adapter_id in self.fail:
            raise AdapterInvalid(f"{record.adapter_id}: sha256 mismatch", code="sha256_mismatch")
        return AdapterBytes.of(b"{}", memoryview(self.buf), record.adapter_id)


class _Rec:
    def __init__(self, adapter_id: str) -> None:
        self.adapter_id = adapter_id


def test_a_fetch_hands_back_its_own_copy_or_its_failure():
    reader = _Reader()
    f = AdapterFetcher(reader.read, max_ready=2)
    try:
        f.start(_Rec("a@v1"))
        f.start(_Rec("a@v1"))  # once while pending
        assert f.pending("a@v1") and f.take("a@v1") is None
        reader.gate.set()
        deadline = time.monotonic() + 5
        while (got := f.take("a@v1")) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(got.adapter, AdapterBytes) and bytes(got.adapter.weights) == b"w" * 64 and got.read_ms > 0
        reader.buf[:] = b"x" * 64  # the reader's next read reuses its buffer: the taken copy must not change
        assert bytes(got.adapter.weights) == b"w" * 64 and not f.pending("a@v1") and f.fetches == 1
        reader.fail.add("b@v1")
        f.start(_Rec("b@v1"))
        while (err := f.take("b@v1")) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(err, AdapterInvalid)
        for name in ("c@v1", "d@v1", "e@v1"):  # nobody takes them: the oldest beyond max_ready goes
            f.start(_Rec(name))
        while f.describe()["fetching"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert f.describe()["ready"] == ["d@v1", "e@v1"] and f.dropped == 1
    finally:
        reader.gate.set()
        f.stop()


def test_a_read_now_is_its_own_copy_while_the_fetch_thread_reads_on():
    """`read_now` (pins, prefetch: the owner thread) and the fetch thread share the store's reused
    buffer; what read_now returned must not change when the fetch thread's next read refills it."""
    reader = _Reader()
    reader.gate.set()
    f = AdapterFetcher(reader.read)
    try:
        mine = f.read_now(_Rec("a@v1"))
        reader.buf[:] = b"y" * 64  # the next read (here: by hand) refills the shared buffer
        f.start(_Rec("b@v1"))
        deadline = time.monotonic() + 5
        while f.take("b@v1") is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bytes(mine.weights) == b"w" * 64
    finally:
        f.stop()


def _slow_reads(monkeypatch, slow_tenants: set[str], fail_tenants: set[str] = frozenset()) -> list[tuple[str, str]]:
    """AdapterStore.read takes SLOW_S for these tenants (and raises for `fail_tenants`); returns a
    log of (thread name, adapter id) per read."""
    real = AdapterStore.read
    log: list[tuple[str, str]] = []

    def read(self, record):
        log.append((threading.current_thread().name, record.adapter_id))
        if record.tenant_id in slow_tenants | set(fail_tenants):
            time.sleep(SLOW_S)
        if record.tenant_id in fail_tenants:
            raise AdapterInvalid(f"{record.adapter_id}: weights sha256 mismatch", code="sha256_mismatch")
        return real(self, record)

    monkeypatch.setattr(AdapterStore, "read", read)
    return log


def _stream(cont, tenant, max_new_tokens):
    return cont.submit(RawRequest({"prompt": "hello world", "max_new_tokens": max_new_tokens, "stream": True},
                                  {"X-Tenant-ID": tenant}))


def _times(ticket, timeout=60.0):
    """(arrival time of each TextDelta, the reply)."""
    times = []
    while True:
        event = ticket.get(timeout=timeout)
        if isinstance(event, Finished):
            return times, event.reply
        assert isinstance(event, TextDelta)
        times.append(time.monotonic())


@pytest.mark.parametrize("background", [True, False])
def test_running_rows_keep_stepping_while_another_adapter_is_read(monkeypatch, make_service, tools, tiny_adapters,
                                                                 background):
    """t-a streams 30 tokens (steps slowed to 20 ms); t-slow's adapter takes SLOW_S to read. With the fetch thread t-a's tokens
    keep coming during the read (no gap near SLOW_S) and the read ran on the fetch thread; reading on
    the scheduler thread instead (background=False: what the scheduler did before) stalls t-a for the
    whole read, which the same assertion sees."""
    log = _slow_reads(monkeypatch, {"t-slow"})  # before the service: its fetcher binds the store's read
    cont = make_service(scheduler="continuous", num_slots=4, kv_rows=4, host_tier_mb=0)
    tools.onboard(cont, "t-a", tiny_adapters["a"])
    tools.onboard(cont, "t-slow", tiny_adapters["b"])
    if not background:
        cont.scheduler.call(lambda: setattr(cont.residency, "_fetcher", None))  # reads on the scheduler thread
    stepper = cont.scheduler.stepper
    decode = stepper.decode_phase
    monkeypatch.setattr(stepper, "decode_phase", lambda: (time.sleep(0.02), decode())[1])  # t-a runs ~0.6 s in all
    running = _stream(cont, "t-a", 30)
    first = running.get(timeout=30)
    assert isinstance(first, TextDelta)
    t_first = time.monotonic()
    slow = _stream(cont, "t-slow", 4)
    times, reply = _times(running)
    times.insert(0, t_first)
    _, slow_reply = _times(slow)
    assert reply.status == 200 and slow_reply.status == 200 and slow_reply.body["adapter"].startswith("t-slow@")
    gaps = [b - a for a, b in zip(times, times[1:])]
    reads = [thread for thread, adapter in log if adapter.startswith("t-slow@")]
    if background:
        assert reads == ["loraplex-adapter-fetch"], log
        assert max(gaps) < SLOW_S / 2, gaps
        assert slow_reply.body["text"] == tools.expected(cont, tiny_adapters["b"], new=4)
        state = cont.describe()
        loaded = next(a for a in state["resident"] if a["tenant"] == "t-slow")
        assert loaded["source"] == "store" and loaded["load_ms"] >= SLOW_S * 1000  # its read counts in load_ms
        assert state["fetch"]["fetches"] == 2 and state["fetch"]["fetching"] == state["fetch"]["ready"] == []
    else:
        assert reads == ["loraplex-scheduler"] and max(gaps) >= SLOW_S * 0.9, (log, gaps)


def test_a_failed_background_read_is_quarantined_and_served_by_the_load_failure_policy(monkeypatch, make_service,
                                                                                       tools, tiny_adapters):
    log = _slow_reads(monkeypatch, set(), fail_tenants={"t-bad"})
    cont = make_service(scheduler="continuous", num_slots=4, kv_rows=4, load_failure_policy="base")
    tools.onboard(cont, "t-bad", tiny_adapters["a"])
    _, reply = _times(_stream(cont, "t-bad", 4))
    assert reply.status == 200 and reply.body["fallback"] == "adapter_load_failed: t-bad@v1", reply.body
    assert [t for t, _ in log] == ["loraplex-adapter-fetch"]
    _, again = _times(_stream(cont, "t-bad", 4))  # quarantined: no second read
    assert again.body["fallback"] == "adapter_load_failed: t-bad@v1" and len(log) == 1
    counters = cont.describe()["counters"]
    assert (counters["load_failures"], counters["quarantine_hits"], counters["loads"]) == (1, 1, 0)


def test_a_store_load_is_imaged_on_the_fetch_thread_and_only_copied_in_on_the_scheduler_thread(
        monkeypatch, make_service, tools, tiny_adapters):
    """The fetch thread makes the adapter's slot image (`image_from_bytes`: checks, conversion,
    transpose); the scheduler thread's part of the load is `load_image`, with no load from the
    bytes and no copy of the slot back out for the host tier, which holds that same image. The
    answer is PEFT's, from the store load and again from the host tier after an eviction."""
    from handler.engine.multilora.engine import MultiLoraEngine

    calls: list[tuple[str, str]] = []
    for name in ("image_from_bytes", "load_image", "load_adapter", "slot_image"):
        real = getattr(MultiLoraEngine, name)

        def logged(*args, _real=real, _name=name):
            calls.append((_name, threading.current_thread().name))
            return _real(*args)

        monkeypatch.setattr(MultiLoraEngine, name, logged)  # before the service: its fetcher binds image_from_bytes
    cont = make_service(scheduler="continuous", num_slots=3, kv_rows=4)  # one resident adapter
    tools.onboard(cont, "t-a", tiny_adapters["a"])
    tools.onboard(cont, "t-b", tiny_adapters["c"])
    for tenant, adapter in (("t-a", "a"), ("t-b", "c"), ("t-a", "a")):  # t-a: store, evicted, host tier
        _, reply = _times(_stream(cont, tenant, 4))
        assert reply.status == 200 and reply.body["text"] == tools.expected(cont, tiny_adapters[adapter], new=4)
    assert calls == [("image_from_bytes", "loraplex-adapter-fetch"), ("load_image", "loraplex-scheduler"),
                     ("image_from_bytes", "loraplex-adapter-fetch"), ("load_image", "loraplex-scheduler"),
                     ("load_image", "loraplex-scheduler")], calls
    state = cont.describe()
    assert [a["source"] for a in state["resident"]] == ["host"]
    assert state["counters"]["host_hits"] == 1 and state["fetch"]["fetches"] == 2
