"""Tasks through the service (issue 14, item 1; real registry, tiny model, no TorchServe): a request
selects one of its tenant's tasks by X-Task, by the body's `task` or by OpenAI's `model:
"<tenant>:<task>"`; none is the `default` task; a pin names a version of a task. Each served row's
log-probabilities are checked against PEFT alone with the adapter that task must serve (three
different random adapters, so a wrong task cannot pass), under both schedulers. Every tenant policy
(key 401, unknown tenant 404, disabled 403) runs first for task requests too."""
from __future__ import annotations

import time

import pytest

from handler.service import RawRequest
from loraplex_testing.oracle import PeftOracle
from tenant_registry.onboarding import ensure_key

TOL = 1e-4
PROMPT = "hello world"
NEW = 6
COMP = {"url_path": "v1/completions"}
CHAT = {"url_path": "v1/chat/completions"}


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, tiny_adapters):
    return PeftOracle(tiny_model_dir, {k: tiny_adapters[k] for k in ("a", "b", "c")})


def _two_tasks(svc, tools, tiny_adapters):
    """acme: default v1 = a; summarize v2 = b, then v3 = c (current)."""
    tools.onboard(svc, "acme", tiny_adapters["a"])
    tools.onboard_task(svc, "acme", tiny_adapters["b"], "summarize")
    tools.onboard_task(svc, "acme", tiny_adapters["c"], "summarize")


@pytest.fixture
def task_tools(tools, tiny_model_dir):
    from tenant_registry.onboarding import onboard
    from tenant_registry.validate import BaseModelSpec

    def onboard_task(svc, tenant, adapter_dir, task):
        spec = BaseModelSpec.from_model_dir(svc.config.base_model_dir or tiny_model_dir)
        return onboard(svc.registry, svc.store, spec, tenant, adapter_dir, svc.config, task=task)

    tools.onboard_task = onboard_task
    return tools


def _ours(headers=None, **fields):
    return RawRequest({"prompt": PROMPT, "max_new_tokens": NEW, "logprobs": 1, **fields},
                      {"X-Tenant-ID": "acme", **(headers or {})})


def _comp(model, headers=None):
    return RawRequest({"model": model, "prompt": PROMPT, "max_tokens": NEW, "temperature": 0, "logprobs": 1},
                      {**COMP, **(headers or {})})


def _served_logprobs(reply) -> tuple[list[str], list[float]]:
    body = reply.body
    if "choices" in body:  # OpenAI completions
        lp = body["choices"][0]["logprobs"]
        return lp["tokens"], lp["token_logprobs"]
    return body["logprobs"]["tokens"], body["logprobs"]["token_logprobs"]


def _assert_served_by(svc, oracle, reply, adapter: str | None) -> None:
    """The reply's tokens are PEFT's greedy tokens with `adapter`, and their log-probs PEFT's (1e-4)."""
    assert reply.status == 200, reply.body
    prompt_ids = oracle.prompt_ids(PROMPT)
    ids = oracle.greedy(adapter, prompt_ids, NEW)
    tokens, logprobs = _served_logprobs(reply)
    assert tokens == [svc.tokenizer.decode([i]) for i in ids], adapter
    want = oracle.token_logprobs(adapter, prompt_ids, ids)
    gaps = [abs(got - want[t, ids[t]].item()) for t, got in enumerate(logprobs)]
    assert max(gaps) < TOL, (adapter, gaps)


def test_the_three_adapters_are_told_apart(oracle):
    """The oracle can tell the tasks' adapters apart: otherwise the tests below would prove nothing."""
    prompt_ids = oracle.prompt_ids(PROMPT)
    first = {}
    for name in ("a", "b", "c", None):
        ids = oracle.greedy(name, prompt_ids, NEW)
        first[name] = oracle.token_logprobs(name, prompt_ids, ids)[0]
    for x in first:
        for y in first:
            if x != y:
                assert (first[x] - first[y]).abs().max().item() > 100 * TOL, (x, y)


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_task_selection_by_header_body_model_pin_and_default(make_service, task_tools, tiny_adapters, oracle,
                                                             scheduler):
    svc = make_service(scheduler=scheduler)
    assert svc.scheduler_kind == scheduler
    _two_tasks(svc, task_tools, tiny_adapters)
    batch = [
        _ours(),                                              # no task: default (a)
        _ours({"X-Task": "summarize"}),                       # header (c)
        _ours(task="summarize"),                              # body (c)
        _ours({"X-Task": "summarize"}, task="summarize"),     # both, agreeing (c)
        _ours(adapter="acme:summarize@v2"),                   # a pinned version of the task (b)
        _ours(task="default"),                                # the default task by name (a)
        _comp("acme:summarize"),                              # OpenAI model (c)
        _comp("acme:summarize@v2"),                           # OpenAI pinned version of a task (b)
        _comp("acme", {"X-Task": "summarize"}),               # OpenAI with the header (c)
        _comp("acme"),                                        # OpenAI, no task (a)
    ]
    replies = svc.handle_batch(batch)
    want = [("default", "acme@v1", "a"), ("summarize", "acme:summarize@v3", "c"),
            ("summarize", "acme:summarize@v3", "c"), ("summarize", "acme:summarize@v3", "c"),
            ("summarize", "acme:summarize@v2", "b"), ("default", "acme@v1", "a"),
            ("summarize", "acme:summarize@v3", "c"), ("summarize", "acme:summarize@v2", "b"),
            ("summarize", "acme:summarize@v3", "c"), ("default", "acme@v1", "a")]
    for i, (reply, (task, adapter_id, adapter)) in enumerate(zip(replies, want)):
        assert reply.status == 200, (i, reply.body)
        shown = reply.body["loraplex"] if "loraplex" in reply.body else reply.body
        assert (shown["task"], shown["adapter"]) == (task, adapter_id), (i, shown)
        _assert_served_by(svc, oracle, reply, adapter)
    assert replies[6].body["model"] == "acme:summarize"
    base = svc.handle_batch([_ours(adapter="base"), _ours({"X-Task": "summarize"}, adapter="base")])
    for reply in base:
        assert reply.body["task"] is None and reply.body["adapter"] == "base"
        _assert_served_by(svc, oracle, reply, None)


def test_streamed_reply_names_the_task(make_service, task_tools, tiny_adapters):
    svc = make_service(scheduler="continuous")
    _two_tasks(svc, task_tools, tiny_adapters)
    from handler.scheduler import Finished

    ticket = svc.submit(_ours({"X-Task": "summarize"}, stream=True))
    while not isinstance(event := ticket.get(timeout=60), Finished):
        pass
    assert event.reply.body["task"] == "summarize" and event.reply.body["adapter"] == "acme:summarize@v3"


@pytest.mark.parametrize("policy", ["reject", "default"])
def test_unknown_task_under_each_policy(make_service, task_tools, tiny_adapters, oracle, policy):
    svc = make_service(unknown_task_policy=policy)
    _two_tasks(svc, task_tools, tiny_adapters)
    header, body, model = svc.handle_batch([_ours({"X-Task": "translate"}), _ours(task="translate"),
                                            _comp("acme:translate")])
    if policy == "reject":
        for reply in (header, body):
            assert reply.status == 404 and reply.body["type"] == "TaskNotFound", reply.body
            assert "'translate'" in reply.body["error"] and "'acme'" in reply.body["error"]
        assert model.status == 404 and model.body["error"]["code"] == "TaskNotFound"
        assert "'translate'" in model.body["error"]["message"]
    else:
        for reply in (header, body, model):
            shown = reply.body.get("loraplex", reply.body)
            assert (shown["task"], shown["adapter"]) == ("default", "acme@v1"), reply.body
            _assert_served_by(svc, oracle, reply, "a")
    # a pin always names a task that must exist, whatever the policy
    pin = svc.handle_batch([_ours(adapter="acme:translate@v2")])[0]
    assert pin.status == 404 and pin.body["type"] == "TaskNotFound"


@pytest.mark.parametrize("worker", ["reject", "default"])
def test_a_tenants_own_unknown_task_rule_overrides_the_workers(make_service, task_tools, tiny_adapters, oracle,
                                                               worker):
    """`TenantPolicy.unknown_task` (tenantctl router --unknown-task) decides for its tenant; "worker"
    (None) falls back to the worker's unknown_task_policy. One registry change, seen by the next request."""
    from tenant_registry.onboarding import router_change

    svc = make_service(unknown_task_policy=worker)
    _two_tasks(svc, task_tools, tiny_adapters)
    own = "default" if worker == "reject" else "reject"
    for rule in (own, "worker"):
        svc.registry.update_policy("acme", router_change(None, unknown_task=rule))
        svc.resolver.on_event({"kind": "policy", "tenant": "acme"})  # what its event does (it may come later)
        effective = worker if rule == "worker" else rule
        for reply in svc.handle_batch([_ours({"X-Task": "translate"}), _comp("acme:translate")]):
            if effective == "reject":
                assert reply.status == 404, reply.body
            else:
                shown = reply.body.get("loraplex", reply.body)
                assert reply.status == 200 and (shown["task"], shown["adapter"]) == ("default", "acme@v1")
                _assert_served_by(svc, oracle, reply, "a")
    assert svc.registry.get_policy("acme").unknown_task is None


def test_a_tenant_without_a_default_task(make_service, task_tools, tiny_adapters, oracle):
    svc = make_service(unknown_task_policy="default")
    task_tools.onboard_task(svc, "acme", tiny_adapters["b"], "summarize")
    none, named = svc.handle_batch([_ours(), _ours({"X-Task": "summarize"})])
    assert none.status == 404 and none.body["type"] == "TaskNotFound" and "'default'" in none.body["error"]
    _assert_served_by(svc, oracle, named, "b")


def _task_shapes():
    return {"header": _ours({"X-Task": "summarize"}), "body": _ours(task="summarize"),
            "unknown task": _ours({"X-Task": "nope"}), "pin": _ours(adapter="acme:summarize@v2"),
            "model": _comp("acme:summarize"), "model pin": _comp("acme:summarize@v2")}


def _with(raw: RawRequest, headers: dict) -> RawRequest:
    return RawRequest(raw.body, {**raw.headers, **headers})


def _error_type(reply) -> str:
    err = reply.body["error"]
    return err["code"] if isinstance(err, dict) else reply.body["type"]


def test_disabled_tenant_is_403_for_every_task_request(make_service, task_tools, tiny_adapters):
    svc = make_service()
    _two_tasks(svc, task_tools, tiny_adapters)
    svc.registry.set_status("acme", "disabled")
    shapes = _task_shapes()
    for name, reply in zip(shapes, svc.handle_batch([_with(r, {"X-Tenant-ID": "acme"}) for r in shapes.values()])):
        assert reply.status == 403 and _error_type(reply) == "TenantDisabled", (name, reply.body)


def test_wrong_key_is_401_for_every_task_request(make_service, task_tools, tiny_adapters):
    svc = make_service(require_tenant_key=True)
    _two_tasks(svc, task_tools, tiny_adapters)
    key = ensure_key(svc.registry, "acme")
    shapes = _task_shapes()
    for headers in ({}, {"X-Tenant-Key": "wrong-" + key[6:]}):
        batch = [_with(r, {"X-Tenant-ID": "acme", **headers}) for r in shapes.values()]
        for name, reply in zip(shapes, svc.handle_batch(batch)):
            assert reply.status == 401 and _error_type(reply) == "TenantUnauthorized", (name, reply.body)
    good = svc.handle_batch([_with(r, {"X-Tenant-ID": "acme", "X-Tenant-Key": key}) for r in shapes.values()])
    assert [r.status for r in good] == [200, 200, 404, 200, 200, 200]


def test_unknown_tenant_policies_hold_for_task_requests(make_service, task_tools, tiny_adapters):
    svc = make_service(unknown_tenant_policy="reject")
    task_tools.onboard(svc, "good", tiny_adapters["a"])
    for name, reply in zip(["header", "body", "model"], svc.handle_batch([
            RawRequest({"prompt": PROMPT, "max_new_tokens": 2}, {"X-Tenant-ID": "nobody", "X-Task": "summarize"}),
            RawRequest({"prompt": PROMPT, "max_new_tokens": 2, "tenant": "nobody", "task": "summarize"}, {}),
            RawRequest({"model": "nobody:summarize", "prompt": PROMPT, "max_tokens": 2}, COMP)])):
        assert reply.status == 404 and _error_type(reply) == "TenantNotFound", (name, reply.body)
    base_svc = make_service()
    reply = base_svc.handle_batch([RawRequest({"prompt": PROMPT, "max_new_tokens": 2},
                                              {"X-Tenant-ID": "nobody", "X-Task": "summarize"})])[0]
    assert reply.status == 200 and reply.body["fallback"] == "unknown_tenant" and reply.body["task"] is None


def test_bad_task_requests_are_400_alone_in_their_batch(make_service, task_tools, tiny_adapters):
    svc = make_service()
    _two_tasks(svc, task_tools, tiny_adapters)
    bad = [
        _ours({"X-Task": "Summarize!"}),                           # not a task name
        _ours({"X-Task": "summarize"}, task="default"),            # header and body disagree
        _ours(task=3),                                             # not a string
        RawRequest({"prompt": PROMPT, "task": "summarize"}, {}),   # a task without a tenant
        _ours({"X-Task": "default"}, adapter="acme:summarize@v2"),  # a pin of another task
        _comp("acme:Bad"),                                         # OpenAI model with a bad task
        _comp("acme:summarize", {"X-Task": "default"}),            # model and header disagree
        _ours({"X-Task": "summarize", "x-task": "default"}),       # the header twice
    ]
    replies = svc.handle_batch([*bad, _ours({"X-Task": "summarize"})])
    for i, reply in enumerate(replies[:-1]):
        assert reply.status == 400, (i, reply.body)
    assert "'model'" in replies[6].body["error"]["message"]  # named as the OpenAI caller sent it
    assert replies[-1].status == 200 and replies[-1].body["task"] == "summarize"


def test_model_list_names_the_tasks(make_service, task_tools, tiny_adapters):
    svc = make_service()
    _two_tasks(svc, task_tools, tiny_adapters)
    listed = svc.handle_batch([RawRequest(b"", {"url_path": "v1/models", "X-Tenant-ID": "acme"})])[0]
    assert [m["id"] for m in listed.body["data"]] == ["base", "acme", "acme:summarize"]


def test_metrics_label_rows_with_their_task(make_service, task_tools, tiny_adapters):
    from handler import metrics

    class Sink:
        seen: list = []

        def record(self, metric, value, labels):
            self.seen.append((metric.name, tuple(labels)))

    svc = make_service(scheduler="static")
    _two_tasks(svc, task_tools, tiny_adapters)
    sink = Sink()
    svc.metrics.sinks.append(sink)
    svc.handle_batch([_ours(), _ours({"X-Task": "summarize"}), _ours(adapter="base")])
    requests = sorted(labels for name, labels in sink.seen if name == metrics.REQUESTS.name)
    assert requests == [("acme", "default", "v1"), ("acme", "none", "_base"), ("acme", "summarize", "v3")]
    loads = sorted(labels[:3] for name, labels in sink.seen if name == metrics.LOADS.name)
    assert loads == [("acme", "default", "v1"), ("acme", "summarize", "v3")]


def _wait_for(cond, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_tasks_stay_resident_side_by_side_and_a_new_version_replaces_only_its_own(
        make_service, task_tools, tiny_adapters, oracle):
    svc = make_service(scheduler="static", num_slots=4)  # two resident adapters
    _two_tasks(svc, task_tools, tiny_adapters)
    for _ in range(2):
        svc.handle_batch([_ours()])
        svc.handle_batch([_ours({"X-Task": "summarize"})])
    view = svc.describe()
    assert sorted(r["adapter"] for r in view["resident"]) == ["acme:summarize@v3", "acme@v1"]
    assert view["counters"]["loads"] == 2 and view["counters"]["evictions_stale"] == 0
    seen = svc.resolver.events_seen
    task_tools.onboard_task(svc, "acme", tiny_adapters["b"], "summarize")  # v4
    _wait_for(lambda: svc.resolver.events_seen > seen, "the onboard event")
    new, old = svc.handle_batch([_ours({"X-Task": "summarize"}), _ours()])
    assert new.body["adapter"] == "acme:summarize@v4" and old.body["adapter"] == "acme@v1"
    _assert_served_by(svc, oracle, new, "b")
    _assert_served_by(svc, oracle, old, "a")
    view = svc.describe()
    assert sorted(r["adapter"] for r in view["resident"]) == ["acme:summarize@v4", "acme@v1"]
    assert view["counters"]["evictions_stale"] == 1  # summarize's v3 only
    # removing one task drops its adapter only; the default task keeps being served
    seen = svc.resolver.events_seen
    svc.registry.remove("acme", task="summarize")
    _wait_for(lambda: svc.resolver.events_seen > seen, "the remove event")
    gone, kept = svc.handle_batch([_ours({"X-Task": "summarize"}), _ours()])
    assert gone.status == 404 and kept.status == 200 and kept.body["adapter"] == "acme@v1"
    assert [r["adapter"] for r in svc.describe()["resident"]] == ["acme@v1"]
