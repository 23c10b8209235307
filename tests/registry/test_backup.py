"""Backup/restore of the whole registry (backup.export_registry / import_registry) on real Redis."""
from __future__ import annotations

import copy
import json
import queue
import threading
import time
import uuid

import pytest

from loraplex_testing.services import redis_server
from tenant_registry.backup import FORMAT_VERSION, BackupInvalid, export_registry, import_registry
from tenant_registry.errors import TenantExists
from tenant_registry.keys import verify_key
from tenant_registry.onboarding import ensure_key, onboard, rotate_key
from tenant_registry.registry import TenantRegistry

from .test_registry import _drain
from .util import keys_under


@pytest.fixture
def populated(registry, store, base_spec, config, tiny_adapters):
    """acme: 3 versions rolled back to v2, key rotated; zeta: disabled; beta: onboarded twice;
    nokey: never issued a key; gone: removed after 2 versions (only its counter is left)."""
    keys = {}
    for src in ("a", "b", "c"):
        onboard(registry, store, base_spec, "acme", tiny_adapters[src], config)
    keys["acme"] = ensure_key(registry, "acme")
    registry.rollback("acme")
    keys["acme"] = rotate_key(registry, "acme")
    onboard(registry, store, base_spec, "zeta", tiny_adapters["b"], config)
    keys["zeta"] = ensure_key(registry, "zeta")
    registry.set_status("zeta", "disabled")
    onboard(registry, store, base_spec, "beta", tiny_adapters["c"], config)
    keys["beta"] = ensure_key(registry, "beta")
    onboard(registry, store, base_spec, "beta", tiny_adapters["a"], config)
    assert ensure_key(registry, "beta") is None
    onboard(registry, store, base_spec, "nokey", tiny_adapters["a"], config)
    for src in ("a", "b"):
        onboard(registry, store, base_spec, "gone", tiny_adapters[src], config)
    ensure_key(registry, "gone")
    registry.remove("gone")
    store.remove_tenant("gone")
    assert registry.get("acme").version == 2 and registry.get("zeta").status == "disabled"
    return keys


def _state(reg: TenantRegistry) -> dict:
    """Everything observable through the registry's public API."""
    tenants = [r.tenant_id for r in reg.list()]
    return {"list": reg.list(), "get": {t: reg.get(t) for t in tenants},
            "history": {t: reg.history(t) for t in tenants},
            "keys": {t: reg.get_key_digest(t) for t in [*tenants, "gone"]},
            "counters": reg.version_counters()}


def _same_except_time(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "exported_at"} == {k: v for k, v in b.items() if k != "exported_at"}


def _check_restored(src: TenantRegistry, dst: TenantRegistry, keys: dict, store) -> None:
    assert _state(dst) == _state(src)
    assert [r.tenant_id for r in dst.list()] == ["acme", "beta", "nokey", "zeta"]
    assert dst.get("zeta").status == "disabled" and dst.get("acme").adapter_id == "acme@v2"
    assert [h.version for h in dst.history("acme")] == [1, 2, 3]
    assert dst.get_key_digest("nokey") is None and dst.get_key_digest("gone") is None
    for t, key in keys.items():
        assert verify_key(dst.get_key_digest(t), key)
    for r in dst.list():
        store.verify(r)  # the restored records point at the (kept) store's files
    # Version numbers continue where they stopped, removed tenants included.
    assert dst.next_version("acme") == 4 and dst.next_version("beta") == 3
    assert dst.next_version("zeta") == 2 and dst.next_version("gone") == 3 and dst.next_version("new") == 1


def test_round_trip_new_prefix_and_fresh_redis(registry, populated, store, redis_url):
    doc = json.loads(json.dumps(export_registry(registry)))  # what a file holds
    assert doc["format_version"] == FORMAT_VERSION and doc["prefix"] == registry.prefix
    assert [t["tenant_id"] for t in doc["tenants"]] == ["acme", "beta", "nokey", "zeta"]
    assert doc["version_seq"] == {"acme": 3, "beta": 2, "gone": 2, "nokey": 1, "zeta": 1}
    for key in populated.values():
        assert key not in json.dumps(doc)  # digests only

    other = TenantRegistry(redis_url, f"test-{uuid.uuid4().hex[:10]}")
    try:
        assert import_registry(other, doc) == 4
        # Export of the restored copy is the same document (but for time and prefix).
        assert _same_except_time({**export_registry(other), "prefix": doc["prefix"]}, doc)
        _check_restored(registry, other, populated, store)
    finally:
        other.close()

    with redis_server() as (url, _proc):
        fresh = TenantRegistry(url, registry.prefix)  # same prefix, another server
        try:
            assert fresh.list() == []
            assert import_registry(fresh, doc) == 4
            _check_restored(registry, fresh, populated, store)
        finally:
            fresh.close()


def test_import_refuses_existing_unless_replace(registry, populated, store, base_spec, config, tiny_adapters):
    doc = export_registry(registry)
    before = export_registry(registry)
    with pytest.raises(TenantExists) as ei:
        import_registry(registry, doc)
    assert "acme" in str(ei.value) and "replace" in str(ei.value)
    assert _same_except_time(export_registry(registry), before)  # nothing written

    # Partly overlapping target: still refused as a whole, nothing written.
    lone = copy.deepcopy(doc)
    lone["tenants"] = [t for t in doc["tenants"] if t["tenant_id"] == "acme"]
    lone["version_seq"] = {"acme": 3}
    registry.remove("beta")
    snapshot = export_registry(registry)
    with pytest.raises(TenantExists):
        import_registry(registry, doc)
    assert _same_except_time(export_registry(registry), snapshot)

    # Change acme after the export, then replace: acme is back to the exported state, but its version
    # counter is never lowered (v4 was handed out, so the next one is v5).
    onboard(registry, store, base_spec, "acme", tiny_adapters["a"], config)
    rotate_key(registry, "acme")
    assert import_registry(registry, doc, replace=True) == 4
    assert registry.get("acme").adapter_id == "acme@v2" and [h.version for h in registry.history("acme")] == [1, 2, 3]
    assert verify_key(registry.get_key_digest("acme"), populated["acme"])
    assert registry.get("beta").version == 2 and verify_key(registry.get_key_digest("beta"), populated["beta"])
    assert registry.next_version("acme") == 5

    # replace also drops a key the backup does not have.
    rotate_key(registry, "nokey")
    import_registry(registry, lone, replace=True)
    import_registry(registry, doc, replace=True)
    assert registry.get_key_digest("nokey") is None


def _mutations():
    def tenant(doc, t):
        return next(x for x in doc["tenants"] if x["tenant_id"] == t)

    return {
        "not an object": lambda d: ["x"],
        "wrong format": lambda d: {**d, "format": "something-else"},
        "future version": lambda d: {**d, "format_version": 2},
        "bool version": lambda d: {**d, "format_version": True},
        "unknown top field": lambda d: {**d, "extra": 1},
        "missing version_seq": lambda d: {k: v for k, v in d.items() if k != "version_seq"},
        "tenants not a list": lambda d: {**d, "tenants": {}},
        "bad record field": lambda d: tenant(d, "zeta")["current"].update(rank="4") or d,
        "unknown record field": lambda d: tenant(d, "zeta")["history"][0].update(x=1) or d,
        "record path escapes": lambda d: tenant(d, "zeta")["history"][0].update(path="../acme/v1") or d,
        "bad status": lambda d: tenant(d, "zeta")["current"].update(status="paused") or d,
        "current not in history": lambda d: tenant(d, "zeta").update(history=[]) or d,
        "current differs from history": lambda d: tenant(d, "zeta")["current"].update(sha256="0" * 64) or d,
        "record of another tenant": lambda d: tenant(d, "zeta")["history"].append(
            tenant(d, "acme")["history"][0]) or d,
        "duplicate history version": lambda d: tenant(d, "beta")["history"].append(
            tenant(d, "beta")["history"][0]) or d,
        "duplicate tenant": lambda d: d["tenants"].append(copy.deepcopy(tenant(d, "zeta"))) or d,
        "bad tenant id": lambda d: tenant(d, "zeta").update(tenant_id="../zeta") or d,
        "counter below versions": lambda d: d["version_seq"].update(acme=1) or d,
        "counter missing": lambda d: d["version_seq"].pop("zeta") and d,
        "counter not int": lambda d: d["version_seq"].update(gone="2") or d,
        "bad counter tenant": lambda d: d["version_seq"].update({"A/B": 2}) or d,
        "bad key digest": lambda d: tenant(d, "zeta")["key_digest"].update(salt="xyz") or d,
        "key digest extra field": lambda d: tenant(d, "zeta")["key_digest"].update(key="lpx_x") or d,
        "tenant missing field": lambda d: tenant(d, "zeta").pop("key_digest") and d,
    }


def test_invalid_backups_write_nothing(registry, populated, redis_url, raw_redis):
    doc = export_registry(registry)
    # "zeta" sorts last, so a broken zeta proves the valid tenants before it were not written either.
    assert doc["tenants"][-1]["tenant_id"] == "zeta"
    target = TenantRegistry(redis_url, f"test-{uuid.uuid4().hex[:10]}")
    try:
        for name, mutate in _mutations().items():
            bad = mutate(copy.deepcopy(doc))
            with pytest.raises(BackupInvalid) as ei:
                import_registry(target, bad, replace=True)
            assert len(str(ei.value)) < 300, name  # one line naming the problem
            assert keys_under(raw_redis, target.prefix) == [], name
        assert import_registry(target, doc) == 4  # the untouched document imports fine
    finally:
        target.close()


def test_import_publishes_one_event_per_tenant(registry, populated, redis_url):
    doc = export_registry(registry)
    target = TenantRegistry(redis_url, f"test-{uuid.uuid4().hex[:10]}")
    q: queue.Queue = queue.Queue()
    stop = threading.Event()
    th = target.subscribe(q.put, stop)
    time.sleep(0.3)
    try:
        import_registry(target, doc)
        events = _drain(q, 4)
        assert _drain(q, 1, timeout=0.3) == []
    finally:
        stop.set()
        th.join(5)
        target.close()
    assert events == [{"tenant": t, "version": v, "kind": "import"}
                      for t, v in [("acme", 2), ("beta", 2), ("nokey", 1), ("zeta", 1)]]


def test_export_of_empty_registry(registry):
    doc = export_registry(registry)
    assert doc["tenants"] == [] and doc["version_seq"] == {}
    assert import_registry(registry, doc) == 0
