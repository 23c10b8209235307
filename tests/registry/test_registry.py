"""TenantRegistry against a real redis-server: history, rollback, status, events, outages."""
from __future__ import annotations

import queue
import threading
import time

import pytest

from loraplex_testing.services import RedisProc, free_port
from tenant_registry.errors import (InvalidTenantId, RegistryUnavailable, TenantExists, TenantNotFound,
                                    VersionConflict, VersionNotFound)
from tenant_registry.onboarding import onboard
from tenant_registry.registry import TenantRegistry
from tenant_registry.schema import TenantRecord

from .util import keys_under


def _rec(tenant: str, version: int, **kw) -> TenantRecord:
    d = dict(tenant_id=tenant, adapter_id=f"{tenant}@v{version}", version=version, path=f"{tenant}/v{version}",
             sha256=f"{version:064x}", rank=4, alpha=8, use_rslora=False, target_modules=["q_proj"],
             base_model="tiny", status="enabled", created_at=time.time(), updated_at=time.time(), nbytes=10)
    d.update(kw)
    return TenantRecord(**d)


def _events(registry):
    q: queue.Queue = queue.Queue()
    stop = threading.Event()
    th = registry.subscribe(q.put, stop)
    time.sleep(0.3)  # let the subscription be confirmed before we publish
    return q, stop, th


def _drain(q, n, timeout=5.0):
    out, deadline = [], time.time() + timeout
    while len(out) < n and time.time() < deadline:
        try:
            out.append(q.get(timeout=0.1))
        except queue.Empty:
            pass
    return out


def test_get_list_unknown(registry):
    with pytest.raises(TenantNotFound):
        registry.get("nobody")
    with pytest.raises(InvalidTenantId):
        registry.get("../etc/passwd")
    with pytest.raises(TenantNotFound):
        registry.history("nobody")
    assert registry.list() == [] and registry.ping() is True


def test_versions_history_and_rollback(registry):
    q, stop, th = _events(registry)
    try:
        for _ in range(3):
            v = registry.next_version("acme")
            registry.put_new_version(_rec("acme", v))
        registry.put_new_version(_rec("zeta", registry.next_version("zeta")))
        assert registry.get("acme").adapter_id == "acme@v3"
        assert [r.version for r in registry.history("acme")] == [1, 2, 3]
        assert [r.tenant_id for r in registry.list()] == ["acme", "zeta"]

        assert registry.rollback("acme").version == 2
        assert registry.rollback("acme").version == 1
        with pytest.raises(VersionNotFound):
            registry.rollback("acme")
        assert registry.rollback("acme", to_version=3).version == 3  # roll forward
        with pytest.raises(VersionNotFound):
            registry.rollback("acme", to_version=7)
        assert [r.version for r in registry.history("acme")] == [1, 2, 3]  # history kept
        # The next onboarding never reuses a number, even after rollbacks.
        assert registry.next_version("acme") == 4
        events = _drain(q, 7)
        assert _drain(q, 1, timeout=0.3) == []  # failed calls published nothing
    finally:
        stop.set()
        th.join(5)
    assert [(e["tenant"], e["version"], e["kind"]) for e in events] == [
        ("acme", 1, "onboard"), ("acme", 2, "onboard"), ("acme", 3, "onboard"), ("zeta", 1, "onboard"),
        ("acme", 2, "rollback"), ("acme", 1, "rollback"), ("acme", 3, "rollback")]
    assert not th.is_alive()


def test_put_conflicts(registry):
    registry.put_new_version(_rec("acme", registry.next_version("acme")))
    with pytest.raises(TenantExists):
        registry.put_new_version(_rec("acme", 1))
    v2, v3 = registry.next_version("acme"), registry.next_version("acme")
    assert (v2, v3) == (2, 3)  # reserved, distinct
    registry.put_new_version(_rec("acme", v3))
    with pytest.raises(VersionConflict):
        registry.put_new_version(_rec("acme", v2))  # older than current: the concurrent newer one won
    assert registry.get("acme").version == 3


def test_disable_enable_and_rollback_keeps_status(registry):
    q, stop, th = _events(registry)
    try:
        registry.put_new_version(_rec("acme", registry.next_version("acme")))
        registry.put_new_version(_rec("acme", registry.next_version("acme")))
        assert registry.set_status("acme", "disabled").status == "disabled"
        assert registry.get("acme").status == "disabled"
        assert registry.rollback("acme").status == "disabled"  # rollback is not a way to re-enable
        assert registry.set_status("acme", "enabled").enabled
        with pytest.raises(TenantNotFound):
            registry.set_status("ghost", "disabled")
        events = _drain(q, 5)
    finally:
        stop.set()
    assert [e["kind"] for e in events] == ["onboard", "onboard", "disable", "rollback", "enable"]


def test_remove_keeps_version_counter(registry, raw_redis, prefix):
    q, stop, th = _events(registry)
    try:
        registry.put_new_version(_rec("acme", registry.next_version("acme")))
        registry.put_new_version(_rec("acme", registry.next_version("acme")))
        removed = registry.remove("acme")
        assert [r.version for r in removed] == [1, 2]
        with pytest.raises(TenantNotFound):
            registry.get("acme")
        with pytest.raises(TenantNotFound):
            registry.remove("acme")
        assert registry.list() == []
        assert keys_under(raw_redis, prefix) == [f"{prefix}:version_seq:acme".encode()]
        assert registry.next_version("acme") == 3  # acme@v1 never means two different adapters
        events = _drain(q, 3)
    finally:
        stop.set()
    assert events[-1] == {"tenant": "acme", "version": 2, "kind": "remove"}


def test_onboarding_disabled_tenant_stays_disabled(registry, store, base_spec, config, tiny_adapters):
    onboard(registry, store, base_spec, "acme", tiny_adapters["a"], config)
    registry.set_status("acme", "disabled")
    rec = onboard(registry, store, base_spec, "acme", tiny_adapters["b"], config)
    assert rec.version == 2 and rec.status == "disabled"


def test_corrupt_record_in_redis_is_an_error(registry, raw_redis, prefix):
    raw_redis.set(f"{prefix}:tenant:acme", b'{"tenant_id": "acme"}')
    with pytest.raises(Exception) as ei:
        registry.get("acme")
    assert "missing record field" in str(ei.value)


def test_redis_down_is_registry_unavailable_and_subscriber_resyncs(tmp_path):
    """A private redis-server we can stop: every call fails fast with RegistryUnavailable, and the
    subscriber reconnects by itself and reports a resync once Redis is back."""
    port = free_port()
    proc = RedisProc(port, tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    proc.start()
    reg = TenantRegistry(proc.url, "outage")
    q: queue.Queue = queue.Queue()
    stop = threading.Event()
    try:
        th = reg.subscribe(q.put, stop)
        time.sleep(0.3)
        reg.put_new_version(_rec("acme", reg.next_version("acme")))
        assert _drain(q, 1)[0]["kind"] == "onboard"

        proc.stop()
        for call in (reg.ping, lambda: reg.get("acme"), reg.list, lambda: reg.history("acme"),
                     lambda: reg.next_version("acme"), lambda: reg.set_status("acme", "disabled"),
                     lambda: reg.rollback("acme"), lambda: reg.remove("acme"),
                     lambda: reg.put_new_version(_rec("acme", 2))):
            t0 = time.monotonic()
            with pytest.raises(RegistryUnavailable) as ei:
                call()
            assert time.monotonic() - t0 < 3.0
            assert ei.value.__cause__ is not None
        time.sleep(0.5)
        assert th.is_alive()

        proc.start()  # same port; data is gone (no persistence in the fixture), the registry recovers anyway
        events = _drain(q, 1, timeout=10)
        assert events == [{"kind": "resync"}]
        assert reg.ping() is True
        reg.put_new_version(_rec("acme", reg.next_version("acme")))
        assert _drain(q, 1)[0] == {"tenant": "acme", "version": 1, "kind": "onboard", "task": "default"}
    finally:
        stop.set()
        reg.close()
        proc.stop()
        proc.cleanup()


def test_subscriber_survives_bad_messages_and_callback_errors(registry, raw_redis, prefix):
    seen = []

    def cb(event):
        seen.append(event)
        if event.get("tenant") == "boom":
            raise RuntimeError("callback bug")

    stop = threading.Event()
    th = registry.subscribe(cb, stop)
    time.sleep(0.3)
    try:
        raw_redis.publish(f"{prefix}:events", b"not json")
        raw_redis.publish(f"{prefix}:events", b'{"kind": "weird"}')
        raw_redis.publish(f"{prefix}:events", b'{"tenant": "boom", "version": 1, "kind": "disable"}')
        raw_redis.publish(f"{prefix}:events", b'{"tenant": "ok", "version": 1, "kind": "enable"}')
        deadline = time.time() + 5
        while len(seen) < 2 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        th.join(5)
    assert [e["tenant"] for e in seen] == ["boom", "ok"]
    assert not th.is_alive()
