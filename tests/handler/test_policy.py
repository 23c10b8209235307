"""Tenant policies hold for every request shape (issue 16, findings 1 and 1c).

Whatever a request asks for (its tenant's adapter, `"adapter": "base"`, a pinned
version, sampling, chat messages, stop strings), a request that names a tenant
is checked against that tenant's key, status and the unknown-tenant policy
before anything is served."""
from __future__ import annotations

import json

import pytest

from handler.service import RawRequest
from tenant_registry.onboarding import ensure_key

# Every body shape a tenant can send ("{t}" is replaced by the tenant id).
SHAPES = {
    "current adapter": {},
    "adapter base": {"adapter": "base"},
    "pinned own version": {"adapter": "{t}@v1"},
    "sampled": {"do_sample": True, "seed": 3, "temperature": 0.8},
    "stop strings": {"stop": ["\n", "zz"]},
    "messages": {"messages": [{"role": "user", "content": "hello world"}]},
}


def _body(shape: str, tenant: str) -> dict:
    fields = {k: (v.replace("{t}", tenant) if isinstance(v, str) else v) for k, v in SHAPES[shape].items()}
    body = {"max_new_tokens": 4, **fields}
    if "messages" not in body:
        body["prompt"] = "hello world"
    return body


def _statuses(svc, tenant, headers=None):
    """One batch holding every shape for `tenant`, plus a good request of another tenant."""
    sent = {"X-Tenant-ID": tenant, **(headers or {})}
    batch = [RawRequest(_body(shape, tenant), sent) for shape in SHAPES]
    batch.append(RawRequest({"prompt": "hello world", "max_new_tokens": 4}, {"X-Tenant-ID": "good"}))
    replies = svc.handle_batch(batch)
    assert replies[-1].status == 200 and replies[-1].body["adapter"] == "good@v1"  # the batch is served
    return dict(zip(SHAPES, replies[:-1]))


def test_disabled_tenant_gets_403_whatever_it_asks_for(make_service, tools, tiny_adapters):
    svc = make_service()
    tools.onboard(svc, "off", tiny_adapters["a"])
    tools.onboard(svc, "good", tiny_adapters["b"])
    svc.registry.set_status("off", "disabled")
    for shape, reply in _statuses(svc, "off").items():
        assert reply.status == 403, (shape, reply.body)
        assert "disabled" in reply.body["error"] and reply.body["type"] == "TenantDisabled", shape


def test_unknown_tenant_under_reject_gets_404_whatever_it_asks_for(make_service, tools, tiny_adapters):
    svc = make_service(unknown_tenant_policy="reject")
    tools.onboard(svc, "good", tiny_adapters["b"])
    for shape, reply in _statuses(svc, "nobody").items():
        assert reply.status == 404, (shape, reply.body)
        assert "nobody" in reply.body["error"], shape


def test_unknown_tenant_under_base_policy_is_flagged_whatever_it_asks_for(make_service, tools, tiny_adapters):
    svc = make_service(unknown_tenant_policy="base")
    tools.onboard(svc, "good", tiny_adapters["b"])
    replies = _statuses(svc, "nobody")
    assert replies.pop("pinned own version").status == 404  # a pin names a version that cannot exist
    for shape, reply in replies.items():
        assert reply.status == 200, (shape, reply.body)
        assert reply.body["adapter"] == "base" and reply.body["fallback"] == "unknown_tenant", shape


def test_tenant_key_is_required_whatever_it_asks_for(make_service, tools, tiny_adapters):
    svc = make_service(require_tenant_key=True)
    tools.onboard(svc, "acme", tiny_adapters["a"])
    tools.onboard(svc, "good", tiny_adapters["b"])
    key = ensure_key(svc.registry, "acme")
    good_key = ensure_key(svc.registry, "good")

    def statuses(tenant, headers):
        sent = {"X-Tenant-ID": tenant, **headers}
        batch = [RawRequest(_body(shape, tenant), sent) for shape in SHAPES]
        batch.append(RawRequest({"prompt": "hello world", "max_new_tokens": 4},
                                {"X-Tenant-ID": "good", "X-Tenant-Key": good_key}))
        replies = svc.handle_batch(batch)
        assert replies[-1].status == 200
        return dict(zip(SHAPES, replies[:-1]))

    for shape, reply in statuses("acme", {}).items():
        assert reply.status == 401, (shape, reply.body)
    for shape, reply in statuses("acme", {"X-Tenant-Key": good_key}).items():
        assert reply.status == 401, (shape, reply.body)  # another tenant's key opens nothing
    for shape, reply in statuses("acme", {"X-Tenant-Key": key}).items():
        assert reply.status == 200, (shape, reply.body)


@pytest.mark.parametrize("headers", [
    {"X-Tenant-ID": "acme", "x-tenant-id": "other"},
    {"X-Tenant-ID": "acme", "x-tenant-id": "acme"},
    {"X-Tenant-ID": "acme", "X-Tenant-Key": "k1", "x-tenant-key": "k2"},
])
def test_a_header_sent_twice_is_refused(make_service, tools, tiny_adapters, headers):
    """TorchServe hands the handler differently-spelt copies of a header as separate entries;
    a proxy may have checked one of them, so the request is ambiguous: 400, never a guess."""
    svc = make_service()
    tools.onboard(svc, "acme", tiny_adapters["a"])
    tools.onboard(svc, "other", tiny_adapters["b"])
    reply = svc.handle_batch([RawRequest({"prompt": "hello world", "max_new_tokens": 4}, headers)])[0]
    assert reply.status == 400, reply.body
    assert "more than once" in reply.body["error"]


def test_5xx_bodies_keep_internals_in_the_log(make_service, tools, tiny_adapters):
    """A 503 for an adapter that cannot be served names the adapter, not the store path or the
    exception; the 200 fallback reason does the same."""
    svc = make_service(load_failure_policy="error")
    record = tools.onboard(svc, "acme", tiny_adapters["a"])
    path = svc.store.path_for(record) / "adapter_model.safetensors"
    path.write_bytes(b"not a safetensors file")
    reply = tools.ask(svc, "acme")
    assert reply.status == 503 and "acme@v1" in reply.body["error"]
    assert str(svc.store.root) not in json.dumps(reply.body) and "Error" not in reply.body["error"]

    base = make_service(load_failure_policy="base")
    record = tools.onboard(base, "acme", tiny_adapters["a"])
    (base.store.path_for(record) / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    reply = tools.ask(base, "acme")
    assert reply.status == 200 and reply.body["fallback"] == "adapter_load_failed: acme@v1"
    assert reply.body["adapter"] == "base"
