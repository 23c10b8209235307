"""tenantctl pin / unpin: the console script in a subprocess against a real Redis; the bound
(`max_pinned_adapters`) refused with a message naming the pinned tenants; events for workers."""
from __future__ import annotations

import json
import threading
import time

import pytest

from tenant_registry.onboarding import onboard
from tenant_registry.registry import PinLimitReached

from .test_cli import ctl  # noqa: F401  (the fixture)


def test_cli_pin_unpin_and_the_bound(ctl, tiny_adapters, registry):  # noqa: F811
    for tenant in ("acme", "zeta", "kilo"):
        assert ctl("onboard", tenant, str(tiny_adapters["a"]))[0] == 0
    env = {"LORAPLEX_MAX_PINNED_ADAPTERS": "2"}
    rc, doc, _ = ctl("--json", "pin", "acme", env_extra=env)
    assert rc == 0 and doc["pinned"] and doc["changed"] and doc["all_pinned"] == ["acme"]
    rc, doc, _ = ctl("--json", "pin", "acme", env_extra=env)
    assert rc == 0 and not doc["changed"]
    rc, _, text = ctl("pin", "zeta", env_extra=env)
    assert rc == 0 and "zeta: pinned (2 of at most 2 pinned: acme, zeta)" in text
    rc, doc, text = ctl("--json", "pin", "kilo", env_extra=env)
    assert rc == 1 and doc["error"]["type"] == "PinLimitReached"
    assert "2 tenant(s) are pinned already (acme, zeta)" in text and "tenantctl unpin" in text
    assert registry.pinned() == ["acme", "zeta"]
    rc, doc, _ = ctl("--json", "unpin", "acme", env_extra=env)
    assert rc == 0 and doc["changed"] and doc["all_pinned"] == ["zeta"]
    rc, doc, _ = ctl("--json", "unpin", "acme", env_extra=env)
    assert rc == 0 and not doc["changed"]
    assert ctl("pin", "kilo", env_extra=env)[0] == 0
    rc, _, text = ctl("pin", "nobody")
    assert rc == 3 and "nobody" in text
    assert ctl("pin", "../x")[0] == 2
    assert registry.pinned() == ["zeta", "kilo"]


def test_registry_pin_events_and_removal(registry, store, base_spec, config, tiny_adapters):
    for tenant in ("acme", "zeta"):
        onboard(registry, store, base_spec, tenant, tiny_adapters["a"], config)
    events, stop, up = [], threading.Event(), threading.Event()
    registry.subscribe(lambda e: up.set() if e.get("kind") == "resync" else events.append(e), stop)
    try:
        deadline = time.monotonic() + 5
        while not up.is_set() and time.monotonic() < deadline:  # the subscription is up once one arrives
            registry._r.publish(registry.channel, json.dumps({"kind": "resync"}))
            up.wait(0.1)
        assert registry.pin("acme", 1)
        with pytest.raises(PinLimitReached, match="acme"):
            registry.pin("zeta", 1)  # refused: publishes nothing
        registry.add_uses({"acme": 3, "zeta": 1})
        registry.add_uses({"zeta": 1})
        assert registry.most_used(5) == ["acme", "zeta"] and registry.most_used(1) == ["acme"]
        registry.remove("acme")
        while len(events) < 2 and time.monotonic() < deadline + 5:
            time.sleep(0.02)
        assert [(e["kind"], e["tenant"]) for e in events] == [("pin", "acme"), ("remove", "acme")]
        assert registry.pinned() == [] and registry.most_used(5) == ["zeta"]  # removal unpins, forgets its uses
    finally:
        stop.set()
