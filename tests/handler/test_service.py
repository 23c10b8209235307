"""The worker's request path (LoraplexService) against a real redis-server, a real
adapter store and the real engines, on a tiny random Llama. PEFT is the oracle."""
from __future__ import annotations

import json
import time

import pytest
from safetensors.torch import load_file, save_file

from handler.service import RawRequest

NEW = 6


@pytest.mark.parametrize("engine", ["multilora", "peft"])
def test_each_tenant_matches_peft_and_unknown_gets_base(make_service, tools, tiny_model_dir, tiny_adapters, engine):
    svc = make_service(engine=engine)
    for name in ("a", "b", "c"):
        tools.onboard(svc, f"t-{name}", tiny_adapters[name])
    prompts = ["hello world", "the quick brown fox", "What is the capital"]
    batch = [RawRequest({"prompt": p, "max_new_tokens": NEW}, {"X-Tenant-ID": f"t-{n}"})
             for n in ("a", "b") for p in prompts[:2]]
    batch.append(RawRequest({"prompt": prompts[2], "max_new_tokens": NEW}, {"X-Tenant-ID": "nobody"}))
    batch.append(RawRequest({"prompt": prompts[0], "max_new_tokens": NEW, "adapter": "base"}, {"X-Tenant-ID": "t-a"}))
    replies = svc.handle_batch(batch)
    assert [r.status for r in replies] == [200] * 6
    for reply, (name, p) in zip(replies[:4], [(n, p) for n in ("a", "b") for p in prompts[:2]]):
        assert reply.body["adapter"] == f"t-{name}@v1" and reply.body["fallback"] is None
        assert reply.body["text"] == tools.expected(svc, tiny_adapters[name], p)
    unknown, forced_base = replies[4].body, replies[5].body
    assert unknown["adapter"] == "base" and unknown["fallback"] == "unknown_tenant"
    assert unknown["text"] == tools.expected(svc, None, prompts[2])
    assert forced_base["adapter"] == "base" and forced_base["fallback"] is None
    assert forced_base["text"] == tools.expected(svc, None, prompts[0])
    # The adapters really change the output (otherwise the checks above prove nothing).
    assert len({replies[0].body["text"], replies[2].body["text"], forced_base["text"]}) == 3


def test_bad_request_fails_alone_in_its_batch(make_service, tools, tiny_model_dir, tiny_adapters):
    svc = make_service()
    tools.onboard(svc, "acme", tiny_adapters["a"])
    batch = [RawRequest({"prompt": "hello world", "max_new_tokens": NEW}, {"X-Tenant-ID": "acme"}),
             RawRequest(b"{not json", {"X-Tenant-ID": "acme"}),
             RawRequest({"prompt": "hello world", "temperature": float("nan")}, {"X-Tenant-ID": "acme"}),
             RawRequest({"prompt": "x", "max_new_tokens": 1000}, {"X-Tenant-ID": "acme"}),
             RawRequest({"prompt": "hello " * 200}, {"X-Tenant-ID": "acme"}),
             RawRequest({"prompt": "x"}, {"X-Tenant-ID": "../etc/passwd"})]
    replies = svc.handle_batch(batch)
    assert [r.status for r in replies] == [200, 400, 400, 400, 413, 400]
    assert "not valid JSON" in replies[1].body["error"]
    assert "max_new_tokens" in replies[3].body["error"] and "32" in replies[3].body["error"]
    assert "tokens" in replies[4].body["error"]
    assert replies[0].body["text"] == tools.expected(svc, tiny_adapters["a"])


def test_lru_eviction_and_reload_keep_outputs_right(make_service, tools, tiny_model_dir, tiny_adapters):
    svc = make_service(num_slots=4)
    for name in ("a", "b", "c"):
        tools.onboard(svc, f"t-{name}", tiny_adapters[name])
    expected = {n: tools.expected(svc, tiny_adapters[n]) for n in ("a", "b", "c")}
    for name in ("a", "b", "c", "a", "c", "b"):
        reply = tools.ask(svc, f"t-{name}")
        assert reply.status == 200 and reply.body["text"] == expected[name]
    state = svc.describe()
    assert len(state["resident"]) == 2
    assert state["resident"][0]["adapter"] == "t-b@v1"  # most recently used first
    assert state["counters"]["evictions_lru"] >= 3 and state["counters"]["loads"] >= 5
    assert set(state["peft_config"]) == {"t-b@v1", "t-c@v1"}
    assert state["decode"]["mode"] == "generate"  # decode: auto on a CPU
    json.dumps(state)


def test_static_decode_config_serves_the_same_answers(make_service, tools, tiny_model_dir, tiny_adapters):
    """`decode: static` (the CUDA-graph loop, run eagerly here) through the whole request path."""
    svc = make_service(decode="static", decode_graph_buckets=2, scheduler="static")  # the decoder serves `generate`
    for name in ("a", "b"):
        tools.onboard(svc, f"t-{name}", tiny_adapters[name])
    for name in ("a", "b", "a"):
        reply = tools.ask(svc, f"t-{name}")
        assert reply.status == 200 and reply.body["text"] == tools.expected(svc, tiny_adapters[name])
    state = svc.describe()["decode"]
    assert state["mode"] == "static" and state["fallbacks"] == 0 and 1 <= len(state["buckets"]) <= 2


def test_idle_adapters_are_evicted(make_service, tools, tiny_adapters):
    svc = make_service(idle_ttl_s=0.3)
    tools.onboard(svc, "acme", tiny_adapters["a"])
    assert tools.ask(svc, "acme").status == 200
    assert [r["adapter"] for r in svc.describe()["resident"]] == ["acme@v1"]
    time.sleep(0.5)
    assert svc.describe()["resident"] == []
    assert svc.describe()["counters"]["evictions_idle"] == 1


def _wait(predicate, timeout=5.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_new_version_and_disable_take_effect_without_restart(make_service, tools, tiny_model_dir, tiny_adapters):
    svc = make_service()
    tools.onboard(svc, "acme", tiny_adapters["a"])
    assert tools.ask(svc, "acme").body["adapter"] == "acme@v1"
    tools.onboard(svc, "acme", tiny_adapters["b"])
    assert _wait(lambda: tools.ask(svc, "acme").body["adapter"] == "acme@v2")
    reply = tools.ask(svc, "acme")
    assert reply.body["text"] == tools.expected(svc, tiny_adapters["b"])
    assert [r["adapter"] for r in svc.describe()["resident"]] == ["acme@v2"]  # stale v1 dropped
    # Pinning an older own version explicitly is allowed; another tenant's is not.
    pinned = tools.ask(svc, "acme", adapter="acme@v1")
    assert pinned.status == 200 and pinned.body["text"] == tools.expected(svc, tiny_adapters["a"])
    tools.onboard(svc, "other", tiny_adapters["c"])
    assert tools.ask(svc, "acme", adapter="other@v1").status == 403
    svc.registry.set_status("acme", "disabled")
    assert _wait(lambda: tools.ask(svc, "acme").status == 403)
    assert "disabled" in tools.ask(svc, "acme").body["error"]
    svc.registry.set_status("acme", "enabled")
    assert _wait(lambda: tools.ask(svc, "acme").status == 200)


def test_policies_reject_unknown_and_require_tenant(make_service, tools):
    svc = make_service(unknown_tenant_policy="reject", require_tenant=True)
    unknown = tools.ask(svc, "nobody")
    assert unknown.status == 404 and "nobody" in unknown.body["error"]
    missing = tools.ask(svc, None)
    assert missing.status == 400 and "X-Tenant-ID" in missing.body["error"]


def _corrupt(svc, record):
    path = svc.store.path_for(record) / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(path))


@pytest.mark.parametrize("policy, status", [("base", 200), ("error", 503)])
def test_altered_adapter_is_quarantined_and_others_unaffected(make_service, tools, tiny_model_dir, tiny_adapters,
                                                              policy, status):
    svc = make_service(load_failure_policy=policy)
    bad = tools.onboard(svc, "bad", tiny_adapters["a"])
    tools.onboard(svc, "good", tiny_adapters["b"])
    _corrupt(svc, bad)
    batch = [RawRequest({"prompt": "hello world", "max_new_tokens": NEW}, {"X-Tenant-ID": t}) for t in ("bad", "good")]
    first, good = svc.handle_batch(batch)
    assert first.status == status
    assert "bad@v1" in json.dumps(first.body)
    if policy == "base":
        assert first.body["adapter"] == "base" and first.body["fallback"].startswith("adapter_load_failed")
        assert first.body["text"] == tools.expected(svc, None)
    assert good.status == 200 and good.body["text"] == tools.expected(svc, tiny_adapters["b"])
    again = tools.ask(svc, "bad")
    assert again.status == status
    counters = svc.describe()["counters"]
    assert counters["load_failures"] == 1 and counters["quarantine_hits"] == 1
    assert "bad@v1" in svc.describe()["quarantined"]


def test_tenant_keys_401_wrong_or_missing_403_disabled(make_service, tools, tiny_adapters):
    from tenant_registry.onboarding import ensure_key, rotate_key

    svc = make_service(require_tenant_key=True)
    tools.onboard(svc, "acme", tiny_adapters["a"])
    tools.onboard(svc, "other", tiny_adapters["b"])
    key = ensure_key(svc.registry, "acme")
    other_key = ensure_key(svc.registry, "other")

    def ask(tenant, key_value, **fields):
        headers = {"X-Tenant-ID": tenant, **({"X-Tenant-Key": key_value} if key_value is not None else {})}
        return svc.handle_batch([RawRequest({"prompt": "hello world", "max_new_tokens": NEW, **fields}, headers)])[0]

    assert ask("acme", key).status == 200 and ask("acme", key).body["adapter"] == "acme@v1"
    assert ask("acme", None).status == 401
    assert ask("acme", key + "x").status == 401
    assert ask("acme", other_key).status == 401  # another tenant's key opens nothing
    assert ask("nobody", key).status == 401  # same answer as a wrong key: existence is not revealed
    assert "X-Tenant-Key" in ask("acme", None).body["error"]
    assert key not in json.dumps(ask("acme", None).body)
    assert ask("other", other_key, adapter="acme@v1").status == 403  # cannot select another tenant's adapter
    new_key = rotate_key(svc.registry, "acme")
    assert _wait(lambda: ask("acme", key).status == 401)  # the rotation event reaches the worker
    assert ask("acme", new_key).status == 200
    svc.registry.set_status("acme", "disabled")
    assert _wait(lambda: ask("acme", new_key).status == 403)
    assert ask("acme", "wrong").status == 401  # authentication comes before the disabled check
