"""The OpenAI-compatible API through the service (real registry, tiny model, no TorchServe): the same
answers as our JSON API, and every tenant policy for every OpenAI request shape, in mixed batches."""
from __future__ import annotations

import pytest

from handler.service import RawRequest
from tenant_registry.onboarding import ensure_key

CHAT = {"url_path": "v1/chat/completions"}
COMP = {"url_path": "v1/completions"}
MODELS = {"url_path": "v1/models"}
MSGS = [{"role": "user", "content": "hello world"}]


def _chat(model, **fields):
    return {"model": model, "messages": MSGS, "max_tokens": 4, "temperature": 0, **fields}


def _comp(model, **fields):
    return {"model": model, "prompt": "hello world", "max_tokens": 4, "temperature": 0, **fields}


def test_greedy_answers_equal_our_json_api(make_service, tools, tiny_adapters):
    svc = make_service()
    tools.onboard(svc, "acme", tiny_adapters["a"])
    tools.onboard(svc, "acme", tiny_adapters["b"])  # v2 current, v1 pinned below
    batch = [
        RawRequest(_chat("acme"), CHAT),
        RawRequest({"messages": MSGS, "max_new_tokens": 4}, {"X-Tenant-ID": "acme"}),
        RawRequest(_comp("acme"), COMP),
        RawRequest({"prompt": "hello world", "max_new_tokens": 4}, {"X-Tenant-ID": "acme"}),
        RawRequest(_comp("acme@v1"), COMP),
        RawRequest(_comp("base"), {**COMP, "X-Tenant-ID": "acme"}),
        RawRequest(_comp("base"), COMP),
    ]
    chat, ours_chat, comp, ours_comp, pinned, base_acme, base = svc.handle_batch(batch)
    assert all(r.status == 200 for r in (chat, ours_chat, comp, ours_comp, pinned, base_acme, base))
    assert chat.body["object"] == "chat.completion"
    assert chat.body["choices"][0]["message"]["content"] == ours_chat.body["text"]
    assert chat.body["usage"]["prompt_tokens"] == ours_chat.body["usage"]["prompt_tokens"]
    assert comp.body["choices"][0]["text"] == ours_comp.body["text"] == tools.expected(svc, tiny_adapters["b"], new=4)
    assert comp.body["loraplex"] == {"tenant": "acme", "task": "default", "adapter": "acme@v2", "version": 2,
                                     "version_by": "current", "fallback": None,
                                     "route": {"task": "default", "by": "default", "score": None}}
    assert pinned.body["choices"][0]["text"] == tools.expected(svc, tiny_adapters["a"], new=4)
    assert pinned.body["loraplex"]["adapter"] == "acme@v1" and pinned.body["model"] == "acme@v1"
    assert (pinned.body["loraplex"]["version"], pinned.body["loraplex"]["version_by"]) == (1, "pinned")
    assert base_acme.body["loraplex"] == {"tenant": "acme", "task": None, "adapter": "base", "version": None,
                                          "version_by": None, "fallback": None, "route": None}
    assert base.body["loraplex"] == {"tenant": None, "task": None, "adapter": "base", "version": None,
                                     "version_by": None, "fallback": "no_tenant", "route": None}
    assert base.body["choices"][0]["text"] == tools.expected(svc, None, new=4)
    assert comp.body["usage"]["total_tokens"] == sum(comp.body["usage"][k] for k in ("prompt_tokens", "completion_tokens"))


# Every OpenAI shape a tenant can send ("{t}" is the tenant id); the tenant comes from `model`,
# or from X-Tenant-ID for model "base" and the model list.
SHAPES = {
    "chat": (CHAT, _chat("{t}")),
    "chat sampled": (CHAT, _chat("{t}", temperature=0.8, seed=3)),
    "chat pinned": (CHAT, _chat("{t}@v1")),
    "chat base": (CHAT, _chat("base")),
    "completions": (COMP, _comp("{t}")),
    "completions stop": (COMP, _comp("{t}", stop=["\n"])),
    "completions base": (COMP, _comp("base")),
    "models": (MODELS, b""),
}


def _statuses(svc, tenant, headers=None, good_headers=None):
    """One batch holding every OpenAI shape for `tenant`, plus good requests of another tenant."""
    batch = []
    for path, body in SHAPES.values():
        if isinstance(body, dict):
            body = {k: (v.replace("{t}", tenant) if isinstance(v, str) else v) for k, v in body.items()}
        sent = {**path, **(headers or {})}
        if isinstance(body, bytes) or body["model"] == "base":
            sent["X-Tenant-ID"] = tenant
        batch.append(RawRequest(body, sent))
    good = {"X-Tenant-ID": "good", **(good_headers or {})}
    batch += [RawRequest({"prompt": "hello world", "max_new_tokens": 4}, good),
              RawRequest(_chat("good"), {**CHAT, **(good_headers or {})})]
    replies = svc.handle_batch(batch)
    assert replies[-2].status == 200 and replies[-2].body["adapter"] == "good@v1"  # the batch is served
    assert replies[-1].status == 200 and replies[-1].body["loraplex"]["adapter"] == "good@v1"
    return dict(zip(SHAPES, replies[:-2]))


def _openai_error(reply, status, code):
    assert reply.status == status, reply.body
    assert set(reply.body) == {"error"} and reply.body["error"]["code"] == code, reply.body
    return reply.body["error"]["message"]


def test_disabled_tenant_gets_403_whatever_it_asks_for(make_service, tools, tiny_adapters):
    svc = make_service()
    tools.onboard(svc, "off", tiny_adapters["a"])
    tools.onboard(svc, "good", tiny_adapters["b"])
    svc.registry.set_status("off", "disabled")
    for shape, reply in _statuses(svc, "off").items():
        assert "disabled" in _openai_error(reply, 403, "TenantDisabled"), shape
        assert reply.body["error"]["type"] == "permission_error"


def test_unknown_tenant_under_reject_gets_404_whatever_it_asks_for(make_service, tools, tiny_adapters):
    svc = make_service(unknown_tenant_policy="reject")
    tools.onboard(svc, "good", tiny_adapters["b"])
    for shape, reply in _statuses(svc, "nobody").items():
        assert "nobody" in _openai_error(reply, 404, "TenantNotFound"), shape


def test_unknown_tenant_under_base_policy_is_flagged(make_service, tools, tiny_adapters):
    svc = make_service(unknown_tenant_policy="base")
    tools.onboard(svc, "good", tiny_adapters["b"])
    replies = _statuses(svc, "nobody")
    _openai_error(replies.pop("chat pinned"), 404, "TenantNotFound")  # a pin of a version that cannot exist
    assert [m["id"] for m in replies.pop("models").body["data"]] == ["base"]  # nobody is not listed
    for shape, reply in replies.items():
        assert reply.status == 200, (shape, reply.body)
        assert reply.body["loraplex"]["adapter"] == "base", shape
        assert reply.body["loraplex"]["fallback"] == "unknown_tenant", shape


def test_tenant_key_is_required_whatever_it_asks_for(make_service, tools, tiny_adapters):
    svc = make_service(require_tenant_key=True)
    tools.onboard(svc, "acme", tiny_adapters["a"])
    tools.onboard(svc, "good", tiny_adapters["b"])
    key, good_key = ensure_key(svc.registry, "acme"), ensure_key(svc.registry, "good")
    good = {"X-Tenant-Key": good_key}
    for headers in ({}, {"X-Tenant-Key": good_key}, {"X-Tenant-Key": "wrong"}):
        for shape, reply in _statuses(svc, "acme", headers, good).items():
            _openai_error(reply, 401, "TenantUnauthorized")
            assert reply.body["error"]["type"] == "authentication_error", shape
    replies = _statuses(svc, "acme", {"X-Tenant-Key": key}, good)
    for shape, reply in replies.items():
        assert reply.status == 200, (shape, reply.body)
    assert [m["id"] for m in replies["models"].body["data"]] == ["base", "acme"]


def test_require_tenant(make_service):
    svc = make_service(require_tenant=True)
    chat, models = svc.handle_batch([RawRequest(_chat("base"), CHAT), RawRequest(b"", MODELS)])
    _openai_error(chat, 400, "TenantRequired")
    _openai_error(models, 400, "TenantRequired")


def test_bad_requests_fail_alone_in_their_batch(make_service, tools, tiny_adapters):
    svc = make_service()
    tools.onboard(svc, "acme", tiny_adapters["a"])
    batch = [
        RawRequest(_chat("acme", stream="yes"), CHAT),
        RawRequest(_chat("acme", logprobs=True, top_logprobs=21), CHAT),
        RawRequest(_chat("acme", n=3), CHAT),
        RawRequest(_chat("acme", max_tokens=10_000), CHAT),
        RawRequest(b"{not json", COMP),
        RawRequest(_chat("acme"), {**CHAT, "X-Tenant-ID": "other"}),
        RawRequest(_chat("acme@v9"), CHAT),
        RawRequest(_chat("acme@latest"), CHAT),
        RawRequest({"prompt": "x"}, {"url_path": "v1/embeddings"}),
        RawRequest({"prompt": "hello world", "max_new_tokens": 4}, {"url_path": "nope"}),
        RawRequest(_comp("acme"), COMP),
        RawRequest({"prompt": "hello world", "max_new_tokens": 4}, {"X-Tenant-ID": "acme", "url_path": ""}),
    ]
    *bad, comp, ours = svc.handle_batch(batch)
    assert "'stream' must be true or false" in _openai_error(bad[0], 400, "InvalidRequest")
    assert "'top_logprobs' must be between 0 and 20" in _openai_error(bad[1], 400, "InvalidRequest")
    assert "'n' must be 1" in _openai_error(bad[2], 400, "InvalidRequest")
    assert "'max_tokens' is 10000; this server allows at most 32" in _openai_error(bad[3], 400, "InvalidRequest")
    assert "not valid JSON" in _openai_error(bad[4], 400, "InvalidRequest")
    _openai_error(bad[5], 400, "TenantConflict")
    assert "acme@v9" in _openai_error(bad[6], 400, "InvalidRequest")
    _openai_error(bad[7], 403, "AdapterNotAllowed")  # not one of its own versions
    assert "'v1/embeddings'" in _openai_error(bad[8], 404, "UnknownEndpoint")
    assert bad[9].status == 404 and "'nope'" in bad[9].body["error"]  # not under v1/: our JSON shape
    want = tools.expected(svc, tiny_adapters["a"], new=4)
    assert comp.status == 200 and comp.body["choices"][0]["text"] == want
    assert ours.status == 200 and ours.body["text"] == want and set(ours.body) == {
        "text", "tenant", "task", "adapter", "version", "version_by", "fallback", "route", "finish_reason",
        "usage"}  # our JSON API (+ the task and why, the version that served and why)


@pytest.mark.parametrize("load_failure_policy, status", [("error", 503), ("base", 200)])
def test_adapter_that_cannot_load(make_service, tools, tiny_adapters, load_failure_policy, status):
    svc = make_service(load_failure_policy=load_failure_policy)
    record = tools.onboard(svc, "acme", tiny_adapters["a"])
    (svc.store.path_for(record) / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    reply = svc.handle_batch([RawRequest(_comp("acme"), COMP)])[0]
    assert reply.status == status, reply.body
    if status == 503:
        assert "acme@v1" in _openai_error(reply, 503, "AdapterLoadFailed")
        assert str(svc.store.root) not in reply.body["error"]["message"]
    else:
        assert reply.body["loraplex"]["fallback"] == "adapter_load_failed: acme@v1"
