"""A/B splits on the request path (issue 14 item 3): the resolver's cached policy, the version choice
(handler/ab_split.py) and the service serving the chosen version in both schedulers."""
from __future__ import annotations

import threading
import time

from handler.tenants import TenantResolver
from tenant_registry.registry import TenantRegistry
from tenant_registry.schema import SplitArm, TenantPolicy


# ---------------------------------------------------------------------------- the resolver's policy cache
def _wait_for(cond, timeout=5.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_resolver_caches_the_policy_and_the_policy_event_drops_it(redis_url, tmp_path, tiny_adapters,
                                                                   tiny_model_dir):
    from loraplex_common.config import LoraplexConfig
    from tenant_registry.onboarding import onboard
    from tenant_registry.store import AdapterStore
    from tenant_registry.validate import BaseModelSpec

    registry = TenantRegistry(redis_url, f"resolver-policy-{time.time_ns()}")
    store = AdapterStore(tmp_path / "store")
    config = LoraplexConfig.from_mapping({"redis_url": redis_url, "redis_prefix": registry.prefix,
                                          "adapter_store": str(tmp_path / "store"), "max_rank": 16})
    spec = BaseModelSpec.from_model_dir(tiny_model_dir)
    for src in ("a", "b"):
        onboard(registry, store, spec, "acme", tiny_adapters[src], config)
    calls = []
    real_get = registry.get_policy
    registry.get_policy = lambda t: calls.append(t) or real_get(t)
    resolver = TenantResolver(registry, refresh_s=3600, stale_s=3600)
    stop = threading.Event()
    registry.subscribe(resolver.on_event, stop)
    time.sleep(0.3)
    try:
        record = resolver.resolve("acme")
        assert resolver.policy("acme") == TenantPolicy() and resolver.policy("acme") == TenantPolicy()
        assert calls == ["acme"]  # cached
        seen = resolver.events_seen
        split = registry.update_policy("acme", lambda p: p.with_split("default", (SplitArm(1, 9), SplitArm(2, 1))))
        assert _wait_for(lambda: resolver.events_seen > seen)
        assert resolver.policy("acme") == split and calls == ["acme", "acme"]  # the event dropped it
        registry.get = None  # the record stayed cached: the policy event touched nothing else
        assert resolver.resolve("acme") == record
    finally:
        stop.set()
        registry.close()
