"""TenantResolver's cache against a change event that arrives while a fetch is in flight
(request threads resolve concurrently with the subscriber thread since the async entry)."""
from __future__ import annotations

from handler.tenants import TenantResolver


class _Registry:
    """The one registry call `resolve` makes; `during_fetch` runs between reading Redis and
    returning, where the subscriber thread's event can land."""

    def __init__(self) -> None:
        self.value = "v1"
        self.during_fetch = None
        self.fetches = 0

    def get(self, tenant_id: str, *, task: str = "default") -> str:
        self.fetches += 1
        value = self.value
        if self.during_fetch is not None:
            hook, self.during_fetch = self.during_fetch, None
            hook()
        return value


def test_a_fetch_that_raced_an_event_is_not_cached() -> None:
    registry = _Registry()
    resolver = TenantResolver(registry, refresh_s=3600, stale_s=3600)

    def publish() -> None:  # v2 is written and its event handled while the v1 read is returning
        registry.value = "v2"
        resolver.on_event({"kind": "onboard", "tenant": "acme"})

    registry.during_fetch = publish
    assert resolver.resolve("acme") == "v1"  # what Redis said when it was asked
    assert resolver.resolve("acme") == "v2"  # not the raced v1 from the cache
    assert registry.fetches == 2
    assert resolver.resolve("acme") == "v2" and registry.fetches == 2  # an undisturbed fetch is cached
