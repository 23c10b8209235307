"""Per-tenant quotas (tenant_registry/quotas.py), enforced inside `onboard` against a real Redis:
max tasks, max versions kept per task, max bytes; a refusal writes nothing."""
from __future__ import annotations

import dataclasses

import pytest

from tenant_registry.onboarding import onboard
from tenant_registry.quotas import QuotaExceeded, QuotaLimits, QuotaUsage, check, usage

from .util import files_under, keys_under


def _with(config, **quotas):
    return dataclasses.replace(config, **quotas)


def test_check_is_pure_and_names_the_quota():
    lim = QuotaLimits(max_tasks=2, max_versions=3, max_bytes=100)
    used = QuotaUsage({"default": 3, "qa": 1}, 90)
    check(lim, used, "acme", "qa", 10)  # an existing task, under every limit: no error
    with pytest.raises(QuotaExceeded) as ei:
        check(lim, used, "acme", "new", 1)
    assert ei.value.quota == "tasks" and ei.value.limit == 2 and "quota_max_tasks = 2" in str(ei.value)
    with pytest.raises(QuotaExceeded) as ei:
        check(lim, used, "acme", "default", 1)
    assert ei.value.quota == "versions" and ei.value.used == 3
    with pytest.raises(QuotaExceeded) as ei:
        check(lim, used, "acme", "qa", 11)
    assert ei.value.quota == "bytes" and "quota_max_bytes = 100" in str(ei.value)
    check(QuotaLimits(), QuotaUsage({"a": 99, "b": 1}, 10**12), "acme", "c", 10**12)  # 0 = no limit


def test_max_tasks_refused_by_onboard(registry, store, base_spec, config, tiny_adapters, raw_redis, prefix):
    cfg = _with(config, quota_max_tasks=2)
    onboard(registry, store, base_spec, "acme", tiny_adapters["a"], cfg)
    onboard(registry, store, base_spec, "acme", tiny_adapters["b"], cfg, task="qa")
    onboard(registry, store, base_spec, "acme", tiny_adapters["a"], cfg, task="qa")  # same task: fine
    keys, files = sorted(keys_under(raw_redis, prefix)), sorted(files_under(store.root))
    with pytest.raises(QuotaExceeded) as ei:
        onboard(registry, store, base_spec, "acme", tiny_adapters["c"], cfg, task="summarize")
    assert ei.value.quota == "tasks" and "summarize" in str(ei.value)
    assert registry.tasks("acme") == ["default", "qa"]
    assert sorted(keys_under(raw_redis, prefix)) == keys and sorted(files_under(store.root)) == files
    # Another tenant has its own count.
    onboard(registry, store, base_spec, "zeta", tiny_adapters["c"], cfg, task="summarize")


def test_max_versions_refused_by_onboard(registry, store, base_spec, config, tiny_adapters):
    cfg = _with(config, quota_max_versions=2)
    onboard(registry, store, base_spec, "acme", tiny_adapters["a"], cfg)
    onboard(registry, store, base_spec, "acme", tiny_adapters["b"], cfg)
    with pytest.raises(QuotaExceeded) as ei:
        onboard(registry, store, base_spec, "acme", tiny_adapters["c"], cfg)
    assert ei.value.quota == "versions"
    assert [h.version for h in registry.history("acme")] == [1, 2] and registry.get("acme").version == 2
    assert store.tenant_versions("acme") == [1, 2]
    # A second task has its own history to fill.
    onboard(registry, store, base_spec, "acme", tiny_adapters["c"], cfg, task="qa")


def test_max_bytes_counts_every_version_of_every_task(registry, store, base_spec, config, tiny_adapters):
    first = onboard(registry, store, base_spec, "acme", tiny_adapters["a"], config)
    cfg = _with(config, quota_max_bytes=2 * first.nbytes)
    onboard(registry, store, base_spec, "acme", tiny_adapters["a"], cfg, task="qa")  # exactly at the limit
    assert usage(registry, "acme").nbytes == 2 * first.nbytes
    with pytest.raises(QuotaExceeded) as ei:
        onboard(registry, store, base_spec, "acme", tiny_adapters["a"], cfg)
    assert ei.value.quota == "bytes" and ei.value.used == 2 * first.nbytes
    assert registry.get("acme").version == 1 and registry.get("acme", task="qa").version == 2
    # Removing a task frees its bytes.
    registry.remove("acme", task="qa")
    onboard(registry, store, base_spec, "acme", tiny_adapters["a"], cfg)


def test_usage_of_unknown_tenant_is_empty(registry):
    assert usage(registry, "nobody") == QuotaUsage({}, 0)
