"""Faults while serving, against real components: Redis stopped and restarted
under a live service (no restart of the service)."""
from __future__ import annotations

import time

from handler.service import LoraplexService, RawRequest
from loraplex_testing.services import free_port
from loraplex_testing.services import RedisServer
from loraplex_common.config import LoraplexConfig
from tenant_registry.onboarding import onboard
from tenant_registry.validate import BaseModelSpec


def _ask(svc, tenant, **fields):
    body = {"prompt": "hello world", "max_new_tokens": 4, **fields}
    return svc.handle_batch([RawRequest(body, {"X-Tenant-ID": tenant})])[0]


def test_redis_outage_serves_known_tenants_from_cache_and_recovers(tiny_model_dir, tiny_adapters, tmp_path):
    redis = RedisServer(free_port(), tmp_path / "redis", persistent=True)  # AOF on: data survives the restart
    redis.start()
    cfg = LoraplexConfig.from_mapping({"redis_url": redis.url, "adapter_store": str(tmp_path / "store"),
                                       "registry_cache_s": 0.2, "registry_stale_s": 60})
    svc = LoraplexService.from_model_dir(tiny_model_dir, cfg)
    spec = BaseModelSpec.from_model_dir(tiny_model_dir)
    try:
        seen = svc.resolver.events_seen
        onboard(svc.registry, svc.store, spec, "known", tiny_adapters["a"], cfg)
        # The onboard event drops the tenant from the worker's cache whenever it arrives; wait
        # for it, so the entry cached next is the one the outage must be served from.
        deadline = time.time() + 10
        while svc.resolver.events_seen == seen and time.time() < deadline:
            time.sleep(0.02)
        assert svc.resolver.events_seen > seen
        before = _ask(svc, "known")
        assert before.status == 200 and before.body["adapter"] == "known@v1"
        assert _ask(svc, "known", adapter="known@v1").status == 200  # a version pin, cached like the record

        redis.stop()
        time.sleep(0.3)  # past registry_cache_s: the worker must try Redis and fall back to its cache
        started = time.monotonic()
        during = _ask(svc, "known")
        assert during.status == 200 and during.body["adapter"] == "known@v1"
        assert during.body["text"] == before.body["text"]
        pinned = _ask(svc, "known", adapter="known@v1")
        assert pinned.status == 200 and pinned.body["text"] == before.body["text"]
        fresh = _ask(svc, "newcomer")
        assert fresh.status == 503 and "registry" in fresh.body["error"]
        # the client is told the registry is unavailable, not where it lives or what the socket said
        assert str(redis.port) not in fresh.body["error"] and "127.0.0.1" not in fresh.body["error"]
        assert "Error" not in fresh.body["error"]
        assert time.monotonic() - started < 15  # bounded by the registry's timeouts, never a hang
        assert svc.describe()["counters"]["registry_stale_hits"] >= 1

        redis.start()
        onboard(svc.registry, svc.store, spec, "newcomer", tiny_adapters["b"], cfg)
        deadline = time.time() + 10
        while time.time() < deadline and _ask(svc, "newcomer").status != 200:
            time.sleep(0.2)
        after = _ask(svc, "newcomer")
        assert after.status == 200 and after.body["adapter"] == "newcomer@v1"
        assert _ask(svc, "known").body["adapter"] == "known@v1"
    finally:
        svc.stop()
        redis.stop()
