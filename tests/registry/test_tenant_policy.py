"""The tenant policy record (issue 14: A/B splits, fallback chain, router): schema, link ids, and the
registry's update_policy / get_policy / remove / rollback / backup on real Redis."""
from __future__ import annotations

import json
import queue
import threading
import time

import pytest

from tenant_registry.backup import BackupInvalid, export_registry, import_registry
from tenant_registry.errors import InvalidTaskName, PolicyInvalid, TenantNotFound
from tenant_registry.ids import format_link, parse_link
from tenant_registry.onboarding import onboard
from tenant_registry.registry import TenantRegistry
from tenant_registry.schema import ChainLink, SplitArm, TenantPolicy, parse_arms

from .test_registry import _drain


# ---------------------------------------------------------------------------- schema and ids
def test_links_parse_and_format():
    cases = {"base": ChainLink(base=True), "summarize": ChainLink("summarize"),
             "summarize@v3": ChainLink("summarize", 3), "default@v2": ChainLink("default", 2),
             "default": ChainLink(), "base@v4": ChainLink("base", 4)}
    for text, link in cases.items():
        assert parse_link(text) == link and format_link(link) == text
    for bad in ["Sum", "", "x:y", "../x"]:
        with pytest.raises(InvalidTaskName):
            parse_link(bad)
    for bad in ["sum@3", "sum@v0", "sum@v", "sum@vx", "@v1", "a@b@v1", "a" * 60, None, 3]:
        with pytest.raises(ValueError) as ei:
            parse_link(bad)
        assert isinstance(ei.value, (PolicyInvalid, InvalidTaskName))
    with pytest.raises(PolicyInvalid, match="base link"):
        ChainLink(task="summarize", base=True)


def test_policy_round_trip_defaults_and_unknown_fields():
    p = TenantPolicy(router="classify", splits={"default": (SplitArm(3, 90), SplitArm(4, 10))},
                     chain=(parse_link("summarize@v2"), parse_link("default"), parse_link("base")),
                     chain_threshold=-1.5, examples={"summarize": ("sum this", "tl;dr")})
    assert TenantPolicy.from_json(p.to_json()) == p
    assert json.loads(p.to_json())["chain"] == ["summarize@v2", "default", "base"]
    assert TenantPolicy.from_json("{}") == TenantPolicy()
    assert TenantPolicy.from_dict({"router": "header", "future_field": [1, 2]}) == TenantPolicy()
    assert TenantPolicy(splits={"default": ()}).splits == {}  # an empty split is no split
    with pytest.raises(TypeError):
        p.splits["x"] = ()  # read-only: workers share one instance
    assert p.split("default") == (SplitArm(3, 90), SplitArm(4, 10)) and p.split("other") == ()
    assert p.with_split("default", ()).splits == {}


@pytest.mark.parametrize("kwargs, match", [
    ({"router": "magic"}, "router"),
    ({"splits": {"default": (SplitArm(3, 90), SplitArm(3, 10))}}, "twice"),
    ({"splits": {"Bad": (SplitArm(3, 90),)}}, "task name"),
    ({"chain": (ChainLink("summarize"),)}, "end with the 'base' link"),
    ({"chain": (ChainLink(base=True), ChainLink("a"), ChainLink(base=True))}, "end with"),
    ({"chain_threshold": float("nan")}, "chain_threshold"),
    ({"examples": {"qa": ("  ",)}}, "non-empty string"),
    ({"examples": {"qa": "not a list"}}, "list"),
])
def test_policy_refusals(kwargs, match):
    with pytest.raises(PolicyInvalid, match=match):
        TenantPolicy(**kwargs)


def test_split_arms_and_their_spelling():
    assert parse_arms(["v3=90", "4=10"]) == (SplitArm(3, 90), SplitArm(4, 10))
    for bad in ["v3", "v3=0", "v0=5", "v3=-1", "x=1", "v3=90=1", "v3=99999999"]:
        with pytest.raises(PolicyInvalid):
            parse_arms([bad])
    with pytest.raises(PolicyInvalid, match="weight"):
        SplitArm(3, True)
    with pytest.raises(PolicyInvalid):
        TenantPolicy.from_dict({"splits": {"default": [{"version": 3}]}})


# ---------------------------------------------------------------------------- registry
@pytest.fixture
def acme(registry, store, base_spec, config, tiny_adapters):
    """acme: default v1, v2; summarize v3."""
    for src, task in (("a", "default"), ("b", "default"), ("c", "summarize")):
        onboard(registry, store, base_spec, "acme", tiny_adapters[src], config, task=task)
    return registry


def _split(task, *arms):
    return lambda p: p.with_split(task, tuple(SplitArm(v, w) for v, w in arms))


def test_update_and_get_policy(acme, raw_redis, prefix):
    assert acme.get_policy("acme") == TenantPolicy() and acme.get_policy("nobody") == TenantPolicy()
    new = acme.update_policy("acme", _split("default", (1, 90), (2, 10)))
    assert new.split("default") == (SplitArm(1, 90), SplitArm(2, 10)) and acme.get_policy("acme") == new
    assert json.loads(raw_redis.get(f"{prefix}:policy:acme"))["splits"] == {
        "default": [{"version": 1, "weight": 90}, {"version": 2, "weight": 10}]}
    cleared = acme.update_policy("acme", lambda p: p.with_split("default", ()))
    assert cleared == TenantPolicy() and raw_redis.get(f"{prefix}:policy:acme") is None  # nothing left behind
    with pytest.raises(TenantNotFound):
        acme.update_policy("nobody", _split("default", (1, 1)))


@pytest.mark.parametrize("change, match", [
    (_split("default", (1, 50), (3, 50)), r"no version v3"),       # v3 is summarize's, not default's
    (_split("default", (1, 50), (9, 50)), r"no version v9"),
    (_split("translate", (1, 1)), r"no task 'translate'"),
    (lambda p: p.replace(chain=(parse_link("translate"), parse_link("base"))), r"no task 'translate'"),
    (lambda p: p.replace(chain=(parse_link("summarize@v1"), parse_link("base"))), r"no version v1"),
    (lambda p: p.replace(examples={"translate": ("x",)}), r"no task 'translate'"),
])
def test_update_policy_refuses_what_the_tenant_lacks(acme, raw_redis, prefix, change, match):
    acme.update_policy("acme", _split("default", (1, 1)))
    before = raw_redis.get(f"{prefix}:policy:acme")
    with pytest.raises(PolicyInvalid, match=match) as ei:
        acme.update_policy("acme", change)
    assert isinstance(ei.value, ValueError)
    assert raw_redis.get(f"{prefix}:policy:acme") == before  # nothing written


def test_one_policy_event_per_change(acme):
    q: queue.Queue = queue.Queue()
    stop = threading.Event()
    acme.subscribe(q.put, stop)
    time.sleep(0.3)
    try:
        acme.update_policy("acme", _split("default", (1, 90), (2, 10)))
        acme.update_policy("acme", lambda p: p.replace(examples={"summarize": ("x",)}))
        acme.rollback("acme")                        # default has a split: the rollback ends it
        events = _drain(q, 4, timeout=3.0)
    finally:
        stop.set()
    assert [(e["kind"], e.get("task"), e["version"]) for e in events] == [
        ("policy", None, None), ("policy", None, None), ("rollback", "default", 1), ("policy", None, None)]


def test_concurrent_updates_lose_nothing(acme):
    """update_policy is one WATCH/MULTI transaction: concurrent read-modify-writes all land."""
    def add(i):
        acme.update_policy("acme", lambda p: p.replace(
            examples={"default": (*p.examples.get("default", ()), f"prompt {i}")}))

    threads = [threading.Thread(target=add, args=(i,)) for i in range(12)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(acme.get_policy("acme").examples["default"]) == sorted(f"prompt {i}" for i in range(12))


def test_rollback_ends_the_split_of_its_task_only(acme, store, base_spec, config, tiny_adapters):
    onboard(acme, store, base_spec, "acme", tiny_adapters["a"], config, task="summarize")  # summarize v4
    acme.update_policy("acme", lambda p: p.with_split("default", (SplitArm(1, 1), SplitArm(2, 1)))
                       .with_split("summarize", (SplitArm(3, 1), SplitArm(4, 1))))
    assert acme.rollback("acme", task="summarize").version == 3
    policy = acme.get_policy("acme")
    assert policy.split("summarize") == () and policy.split("default") == (SplitArm(1, 1), SplitArm(2, 1))


def test_remove_prunes_or_deletes_the_policy(acme, raw_redis, prefix):
    acme.update_policy("acme", lambda p: TenantPolicy(
        splits={"default": (SplitArm(1, 1), SplitArm(2, 1)), "summarize": (SplitArm(3, 1),)},
        chain=(parse_link("summarize"), parse_link("default@v1"), parse_link("base")), chain_threshold=-2.0,
        examples={"summarize": ("a",), "default": ("b",)}))
    acme.remove("acme", task="summarize")
    left = acme.get_policy("acme")
    assert left == TenantPolicy(splits={"default": (SplitArm(1, 1), SplitArm(2, 1))},
                                chain=(parse_link("default@v1"), parse_link("base")), chain_threshold=-2.0,
                                examples={"default": ("b",)})
    acme.remove("acme")
    assert raw_redis.get(f"{prefix}:policy:acme") is None


def test_backup_and_restore_carry_the_policy(acme, redis_url, prefix, store, base_spec, config, tiny_adapters):
    policy = acme.update_policy("acme", lambda p: p.with_split("default", (SplitArm(1, 9), SplitArm(2, 1))))
    snap = acme.snapshot("acme")
    assert snap.policy == policy
    doc = json.loads(json.dumps(export_registry(acme)))
    assert doc["tenants"][0]["policy"]["splits"]["default"] == [{"version": 1, "weight": 9},
                                                                {"version": 2, "weight": 1}]
    target = TenantRegistry(redis_url, prefix + "-restored")
    try:
        import_registry(target, doc)
        assert target.get_policy("acme") == policy
        # replace with a backup without a policy: the old policy goes too
        no_policy = json.loads(json.dumps(doc))
        del no_policy["tenants"][0]["policy"]
        import_registry(target, no_policy, replace=True)
        assert target.get_policy("acme") == TenantPolicy()
        # a backup whose split names a version the tenant lacks is refused whole, nothing written
        bad = json.loads(json.dumps(doc))
        bad["tenants"][0]["policy"]["splits"]["default"][0]["version"] = 7
        with pytest.raises(BackupInvalid, match="no version v7"):
            import_registry(target, bad, replace=True)
        assert target.get_policy("acme") == TenantPolicy()
    finally:
        target.close()


# ---------------------------------------------------------------------------- tenantctl split / HTTP /split
from .test_cli import ctl  # noqa: E402,F401  (the installed tenantctl against this test's prefix)


def test_tenantctl_split(ctl, tiny_adapters, redis_url, prefix, tmp_path):
    for src, extra in (("a", ()), ("b", ()), ("c", ("--task", "qa"))):
        assert ctl("onboard", "acme", str(tiny_adapters[src]), *extra)[0] == 0
    rc, doc, _ = ctl("--json", "split", "acme", "--task", "default", "v1=90", "v2=10")
    assert rc == 0 and doc["splits"] == {"default": [{"version": 1, "weight": 90}, {"version": 2, "weight": 10}]}
    assert TenantRegistry(redis_url, prefix).get_policy("acme").split("default") == (SplitArm(1, 90), SplitArm(2, 10))
    rc, _, text = ctl("show", "acme")
    assert rc == 0 and "split:       v1=90 v2=10" in text
    rc, doc, _ = ctl("--json", "show", "acme", "--task", "qa")
    assert rc == 0 and doc["split"] == []
    assert ctl("split", "acme", "--task", "qa", "v3=1")[0] == 0
    rc, _, text = ctl("split", "acme")
    assert rc == 0 and "task default: split v1=90 v2=10" in text and "task qa: split v3=1" in text
    # refusals: nothing written, exit 2 (a bad arm or a version not in that task's history), 3 (unknown)
    for args, code, words in ((("v1=90", "v3=10"), 2, "no version v3"), (("v1=0",), 2, "weight"),
                              (("v1",), 2, "expected 'v<version>=<weight>'"), ((), 0, "")):
        rc, _, text = ctl("split", "acme", "--task", "default", *args)
        assert rc == code and words in text, text
    assert ctl("split", "nobody", "v1=1")[0] == 3
    assert ctl("split", "acme", "--task", "nope", "v1=1")[0] == 3
    assert ctl("split", "acme", "--clear", "v1=1")[0] == 2
    # a version whose stored files were altered is refused before workers are pointed at it
    (tmp_path / "store" / "acme" / "v2" / "adapter_model.safetensors").write_bytes(b"x")
    rc, _, text = ctl("split", "acme", "v1=50", "v2=50")
    assert rc == 4, text
    # --clear of one task, then of every task
    rc, doc, _ = ctl("--json", "split", "acme", "--task", "qa", "--clear")
    assert rc == 0 and doc["splits"] == {"default": [{"version": 1, "weight": 90}, {"version": 2, "weight": 10}]}
    assert ctl("split", "acme", "--task", "qa", "v3=1")[0] == 0
    rc, doc, _ = ctl("--json", "split", "acme", "--clear")
    assert rc == 0 and doc["splits"] == {}
    assert TenantRegistry(redis_url, prefix).get_policy("acme") == TenantPolicy()


@pytest.fixture
def api(config, tmp_path, acme):
    from tenant_registry.http_api import OnboardingApi

    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"management": {"key": "sekrit"}}))
    return OnboardingApi(config, key_file=key_file)


def _http(api, method, path, query=None, body=None):
    from tenant_registry.http_api import Request

    raw = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    reply = api.handle(Request(method, path, query or {}, {"authorization": ["Bearer sekrit"]}, raw))
    return reply.status, reply.doc


def test_http_split_endpoint(api, acme, raw_redis, prefix):
    assert _http(api, "GET", "/tenants/acme/split") == (200, {"tenant": "acme", "splits": {}})
    status, doc = _http(api, "POST", "/tenants/acme/split", body={"task": "default", "arms": {"v1": 90, "v2": 10}})
    assert status == 200 and doc["splits"] == {"default": [{"version": 1, "weight": 90}, {"version": 2, "weight": 10}]}
    status, doc = _http(api, "PUT", "/tenants/acme/split", {"task": "summarize", "arms": "v3=1"})
    assert status == 200 and sorted(doc["splits"]) == ["default", "summarize"]
    assert _http(api, "GET", "/tenants/acme")[1]["tasks"]["default"]["split"] == [{"version": 1, "weight": 90},
                                                                                  {"version": 2, "weight": 10}]
    before = raw_redis.get(f"{prefix}:policy:acme")
    for method, query, body, status, words in (
            ("POST", None, {"arms": {"v1": 50, "v3": 50}}, 400, "no version v3"),
            ("POST", None, {"arms": {"v1": True}}, 400, "expected 'v<version>=<weight>'"),
            ("POST", None, {"arms": {"v1": 1}, "extra": 1}, 400, "JSON body must be"),
            ("POST", None, [1, 2], 400, "JSON body must be"),
            ("POST", None, b"{not json", 400, "not JSON"),
            ("POST", {"task": "nope", "arms": "v1=1"}, None, 404, "no task 'nope'"),
            ("POST", {"task": "Bad!", "arms": "v1=1"}, None, 400, "invalid task name"),
            ("POST", {"arms": "v1=1", "x": "1"}, None, 400, "unknown query"),
            ("POST", {}, None, 400, "needs arms"),
            ("PATCH", None, None, 405, "not allowed")):
        got, doc = _http(api, method, "/tenants/acme/split", query, body)
        assert got == status and words in doc["error"]["message"], (method, query, body, doc)
    assert raw_redis.get(f"{prefix}:policy:acme") == before  # nothing written by the refusals
    assert _http(api, "POST", "/tenants/nobody/split", {"arms": "v1=1"})[0] == 404
    status, doc = _http(api, "DELETE", "/tenants/acme/split", {"task": "summarize"})
    assert status == 200 and sorted(doc["splits"]) == ["default"]
    status, doc = _http(api, "DELETE", "/tenants/acme/split")
    assert status == 200 and doc["splits"] == {} and raw_redis.get(f"{prefix}:policy:acme") is None
