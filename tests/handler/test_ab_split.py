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


# ---------------------------------------------------------------------------- the version choice
from collections import Counter  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402

from handler.ab_split import SPLIT, SPLIT_MISSING, SplitChooser, pick_arm, split_point  # noqa: E402
from handler.service import RawRequest  # noqa: E402
from loraplex_testing.oracle import PeftOracle  # noqa: E402

TOL = 1e-4
PROMPT = "hello world"
NEW = 3


def test_pick_arm_is_sticky_and_weighted():
    arms = (SplitArm(3, 90), SplitArm(4, 10))
    assert all(pick_arm(arms, "acme", "default", f"u{i}") == pick_arm(arms, "acme", "default", f"u{i}")
               for i in range(200))
    by_user = Counter(pick_arm(arms, "acme", "default", f"user-{i}").version for i in range(20_000))
    assert abs(by_user[4] / 20_000 - 0.10) < 0.01
    # the point is sha256("tenant:task:user") mod the total weight: another task or tenant re-deals users
    assert split_point("acme", "default", "u1", 100) != split_point("acme", "summarize", "u1", 100) or \
        split_point("acme", "default", "u2", 100) != split_point("acme", "summarize", "u2", 100)
    rng = random.Random(7)
    no_user = Counter(pick_arm(arms, "acme", "default", None, rng.random).version for _ in range(20_000))
    assert abs(no_user[4] / 20_000 - 0.10) < 0.01
    assert pick_arm(arms, "acme", "default", None, lambda: 0.9999999999) == SplitArm(4, 10)  # the top edge
    assert pick_arm((SplitArm(1, 9), SplitArm(2, 1)), "t", "k", None, lambda: 0.0) == SplitArm(1, 9)
    # relative weights: 90/10 and 9/1 put every user on the same version
    nine_one = (SplitArm(3, 9), SplitArm(4, 1))
    assert all(pick_arm(arms, "acme", "default", f"user-{i}").version ==
               pick_arm(nine_one, "acme", "default", f"user-{i}").version for i in range(2000))


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, tiny_adapters):
    return PeftOracle(tiny_model_dir, {k: tiny_adapters[k] for k in ("a", "b")})


@pytest.fixture(scope="module")
def expected(oracle):
    """adapter name -> (greedy token ids, their log-probs) from PEFT for PROMPT."""
    prompt_ids = oracle.prompt_ids(PROMPT)
    out = {}
    for name in ("a", "b"):
        ids = oracle.greedy(name, prompt_ids, NEW)
        lp = oracle.token_logprobs(name, prompt_ids, ids)
        out[name] = (ids, [lp[t, ids[t]].item() for t in range(len(ids))])
    gap = max(abs(x - y) for x, y in zip(out["a"][1], out["b"][1]))
    assert gap > 100 * TOL  # the two versions are told apart by their log-probs, not only by a label
    return out


def _acme_two_versions(svc, tools, tiny_adapters):
    """acme's default task: v1 = adapter a, v2 = adapter b (current)."""
    tools.onboard(svc, "acme", tiny_adapters["a"])
    tools.onboard(svc, "acme", tiny_adapters["b"])


VERSION_ADAPTER = {1: "a", 2: "b"}


def _req(user=None, **fields):
    headers = {"X-Tenant-ID": "acme", **({"X-User-ID": user} if user is not None else {})}
    return RawRequest({"prompt": PROMPT, "max_new_tokens": NEW, "logprobs": 1, **fields}, headers)


def _served_version(svc, reply, expected) -> int:
    """The version the reply says served it, after checking that its tokens and log-probs are PEFT's
    with that version's adapter (so a right label on the wrong adapter fails)."""
    assert reply.status == 200, reply.body
    body = reply.body["loraplex"] if "loraplex" in reply.body else reply.body
    version = body["version"]
    assert body["adapter"] == f"acme@v{version}"
    ids, want = expected[VERSION_ADAPTER[version]]
    lp = reply.body["choices"][0]["logprobs"] if "choices" in reply.body else reply.body["logprobs"]
    assert lp["tokens"] == [svc.tokenizer.decode([i]) for i in ids]
    assert max(abs(g - w) for g, w in zip(lp["token_logprobs"], want)) < TOL
    return version


def _ask_all(svc, raws, chunk=40):
    out = []
    for i in range(0, len(raws), chunk):
        out += svc.handle_batch(raws[i:i + chunk])
    return out


def _set_split(svc, *arms):
    seen = svc.resolver.events_seen
    svc.registry.update_policy("acme", lambda p: p.with_split("default", tuple(SplitArm(v, w) for v, w in arms)))
    assert _wait_for(lambda: svc.resolver.events_seen > seen)


EVEN_SPLIT = (SplitArm(1, 50), SplitArm(2, 50))


def _acme_even_split(svc, tools, tiny_adapters):
    """acme's two versions (`_acme_two_versions`) under a 50/50 split; returns the split's arms."""
    _acme_two_versions(svc, tools, tiny_adapters)
    _set_split(svc, *((a.version, a.weight) for a in EVEN_SPLIT))
    return EVEN_SPLIT


def test_split_90_10_over_1000_requests(make_service, tools, tiny_adapters, expected):
    svc = make_service(scheduler="static")
    _acme_two_versions(svc, tools, tiny_adapters)
    _set_split(svc, (1, 90), (2, 10))
    svc.splits._rand = random.Random(20261201).random  # a fixed stream: the figure below is reproducible
    replies = _ask_all(svc, [_req() for _ in range(1000)], chunk=100)
    versions = Counter(_served_version(svc, r, expected) for r in replies)
    assert all(r.body["version_by"] == SPLIT for r in replies)
    share = versions[2] / 1000
    print(f"90/10 split over 1000 requests: v1 {versions[1]}, v2 {versions[2]} ({share:.1%} v2)")
    assert abs(share - 0.10) <= 0.03 and versions[1] + versions[2] == 1000
    assert svc.describe()["splits"] == {"acme": {"default": {"v1": versions[1], "v2": versions[2]}}}


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_sticky_users_never_switch(make_service, tools, tiny_adapters, expected, scheduler):
    svc = make_service(scheduler=scheduler)
    assert svc.scheduler_kind == scheduler
    _acme_two_versions(svc, tools, tiny_adapters)
    _set_split(svc, (1, 90), (2, 10))
    users = [f"user-{i}" for i in range(200)]
    rounds = []
    for r in range(3):
        order = users[:]
        random.Random(r).shuffle(order)  # a user lands in another batch, next to other users, each round
        replies = _ask_all(svc, [_req(u) for u in order])
        rounds.append({u: _served_version(svc, rep, expected) for u, rep in zip(order, replies)})
    assert rounds[0] == rounds[1] == rounds[2]
    # every worker agrees: the version is the one the sticky hash names, not this worker's memory
    assert rounds[0] == {u: pick_arm((SplitArm(1, 90), SplitArm(2, 10)), "acme", "default", u).version for u in users}
    assert 0.03 <= sum(v == 2 for v in rounds[0].values()) / 200 <= 0.2  # both arms hold users
    # a pinned @vN wins over the split, and a request with no X-User-ID is still served by an arm
    pinned = svc.handle_batch([_req(u, adapter="acme@v1") for u in users if rounds[0][u] == 2][:5])
    assert all(_served_version(svc, r, expected) == 1 and r.body["version_by"] == "pinned" for r in pinned)


def _user_on(version, arms, tenant="acme", task="default"):
    return next(u for u in (f"probe-{i}" for i in range(10_000))
                if pick_arm(arms, tenant, task, u).version == version)


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_clear_and_rollback_take_effect_on_the_next_request_on_every_worker(make_service, tools, tiny_adapters,
                                                                            expected, scheduler):
    one = make_service(scheduler=scheduler)
    two = make_service(scheduler=scheduler, redis_prefix=one.config.redis_prefix,
                       adapter_store=one.config.adapter_store)  # a second worker of the same deployment
    _acme_two_versions(one, tools, tiny_adapters)
    arms = ((1, 50), (2, 50))
    split_arms = tuple(SplitArm(v, w) for v, w in arms)
    u1, u2 = _user_on(1, split_arms), _user_on(2, split_arms)

    def versions(svc, *raws):
        return [(_served_version(svc, r, expected), r.body["version_by"]) for r in svc.handle_batch(list(raws))]

    def on_both(change):
        seen = (one.resolver.events_seen, two.resolver.events_seen)
        change()
        assert _wait_for(lambda: one.resolver.events_seen > seen[0] and two.resolver.events_seen > seen[1])

    on_both(lambda: one.registry.update_policy("acme", lambda p: p.with_split("default", split_arms)))
    for svc in (one, two):
        assert versions(svc, _req(u1), _req(u2)) == [(1, "split"), (2, "split")]
    on_both(lambda: one.registry.update_policy("acme", lambda p: p.with_split("default", ())))  # --clear
    for svc in (one, two):
        assert versions(svc, _req(u1), _req(u2)) == [(2, "current"), (2, "current")]
    on_both(lambda: one.registry.update_policy("acme", lambda p: p.with_split("default", split_arms)))
    assert versions(two, _req(u1), _req(u2)) == [(1, "split"), (2, "split")]
    on_both(lambda: one.registry.rollback("acme"))  # back to v1, and the split ends with it
    for svc in (one, two):
        assert versions(svc, _req(u1), _req(u2)) == [(1, "current"), (1, "current")]
    assert one.registry.get_policy("acme").split("default") == ()


def test_an_arm_gone_from_the_history_serves_the_current_version(make_service, tools, tiny_adapters, expected):
    import redis as redis_lib

    svc = make_service(scheduler="static")
    split_arms = _acme_even_split(svc, tools, tiny_adapters)
    u1 = _user_on(1, split_arms)
    # v1 vanishes from the history behind the registry's back (an old backup restored, a hand edit)
    r = redis_lib.Redis.from_url(svc.config.redis_url)
    try:
        assert r.hdel(f"{svc.config.redis_prefix}:history:acme", "1") == 1
    finally:
        r.close()
    replies = svc.handle_batch([_req(u1), _req(u1), _req(_user_on(2, split_arms))])
    assert [(_served_version(svc, x, expected), x.body["version_by"]) for x in replies] == [
        (2, SPLIT_MISSING), (2, SPLIT_MISSING), (2, SPLIT)]
    assert svc.describe()["splits"]["acme"]["default"] == {"missing": 2, "v2": 1}


def test_openai_reply_names_the_version_and_the_split(make_service, tools, tiny_adapters, expected):
    svc = make_service(scheduler="static")
    split_arms = _acme_even_split(svc, tools, tiny_adapters)
    u1 = _user_on(1, split_arms)
    raw = RawRequest({"model": "acme", "prompt": PROMPT, "max_tokens": NEW, "temperature": 0, "logprobs": 1},
                     {"url_path": "v1/completions", "X-User-ID": u1})
    reply = svc.handle_batch([raw])[0]
    assert _served_version(svc, reply, expected) == 1
    assert reply.body["loraplex"]["version_by"] == "split"


def test_x_user_id_is_checked(make_service, tools, tiny_adapters):
    svc = make_service(scheduler="static")
    _acme_two_versions(svc, tools, tiny_adapters)
    bad = svc.handle_batch([_req("x" * 129), _req("a\nb")])
    assert [b.status for b in bad] == [400, 400] and "X-User-ID" in bad[0].body["error"]


def test_split_chooser_counts_only_split_answers():
    chooser = SplitChooser()
    from tenant_registry.schema import TenantRecord
    rec = TenantRecord(tenant_id="acme", adapter_id="acme@v3", version=3, path="acme/v3", sha256="a" * 64, rank=4,
                       alpha=8.0, use_rslora=False, target_modules=("q_proj",), base_model="x", status="enabled",
                       created_at=1.0, updated_at=1.0, nbytes=1)
    chooser.served(rec, "current")
    chooser.served(rec, "pinned")
    chooser.served(rec, SPLIT)
    assert chooser.snapshot() == {"acme": {"default": {"v3": 1}}}


def test_a_streamed_reply_names_the_split_version(make_service, tools, tiny_adapters, expected):
    import json as json_lib

    from handler.scheduler import Finished
    from handler.stream_format import NdjsonStream

    svc = make_service(scheduler="continuous")
    split_arms = _acme_even_split(svc, tools, tiny_adapters)
    ticket = svc.submit(_req(_user_on(1, split_arms), stream=True))
    while not isinstance(event := ticket.get(timeout=60), Finished):
        pass
    assert _served_version(svc, event.reply, expected) == 1
    stream = NdjsonStream()
    last = json_lib.loads(stream.finish(200, event.reply.body).splitlines()[-1])
    assert (last["version"], last["version_by"], last["adapter"]) == (1, "split", "acme@v1")
