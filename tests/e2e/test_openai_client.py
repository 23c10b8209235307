"""The OpenAI-compatible API over a real TorchServe, driven by the official `openai` client (PyPI)
with base_url .../predictions/loraplex/1.0/v1 and TorchServe's inference token as api_key.
PEFT (stack.expected) and our own JSON API are the oracles for the greedy answers."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.e2e

PROMPT = "hello world"


def _client(stack, **kwargs):
    return openai.OpenAI(base_url=f"{stack.ts.inference_url}/predictions/loraplex/1.0/v1",
                         api_key=stack.ts.keys()["inference"]["key"], max_retries=0, timeout=120, **kwargs)


def _onboard(stack, tenant, adapter) -> dict:
    done = stack.tenantctl("onboard", tenant, str(adapter))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def tenants(stack, tiny_adapters):
    """oai-a: v1 = adapter a, v2 (current) = adapter b; oai-off: disabled."""
    first = _onboard(stack, "oai-a", tiny_adapters["a"])
    _onboard(stack, "oai-a", tiny_adapters["b"])
    _onboard(stack, "oai-off", tiny_adapters["c"])
    assert stack.tenantctl("disable", "oai-off").returncode == 0
    return {"key": first["tenant_key"]}


def test_url_path_as_torchserve_sends_it(stack, tenants):
    """What TorchServe 0.12 puts in url_path, seen through the handler's answers."""
    auth = {"Authorization": f"Bearer {stack.ts.keys()['inference']['key']}", "X-Tenant-ID": "oai-a"}
    body = {"prompt": PROMPT, "max_new_tokens": 2}
    base = f"{stack.ts.inference_url}/predictions/loraplex"
    for url in (base, f"{base}/1.0"):  # url_path "" : our JSON API
        r = requests.post(url, json=body, headers=auth, timeout=120)
        assert r.status_code == 200 and r.json()["adapter"] == "oai-a@v2", (url, r.text)
    # A client's own url_path header is overwritten by the frontend's.
    r = requests.post(base, json=body, headers={**auth, "url_path": "v1/models"}, timeout=120)
    assert r.status_code == 200 and r.json()["adapter"] == "oai-a@v2", r.text
    # Everything after /<version>/ (trailing slash dropped), echoed by the 404.
    r = requests.post(f"{base}/1.0/v1/embeddings/x/", json=body, headers=auth, timeout=120)
    assert r.status_code == 404 and "'v1/embeddings/x'" in r.json()["error"]["message"], r.text
    r = requests.post(f"{base}/1.0/admin", json=body, headers=auth, timeout=120)
    assert r.status_code == 404 and "'admin'" in r.json()["error"], r.text
    r = requests.get(f"{base}/1.0/v1/models", headers=auth, timeout=120)  # a GET: an empty body
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["base", "oai-a"], r.text
    assert r.headers.get("content-type") == "application/json"


def test_completions_and_chat_greedy_equal_our_json_api_and_peft(stack, tenants, tiny_adapters):
    client = _client(stack)
    want = stack.expected(tiny_adapters["b"], PROMPT)
    out = client.completions.create(model="oai-a", prompt=PROMPT, max_tokens=stack.new_tokens, temperature=0)
    ours = stack.ask("oai-a", {"prompt": PROMPT, "max_new_tokens": stack.new_tokens}).json()
    assert out.choices[0].text == ours["text"] == want
    assert out.object == "text_completion" and out.model == "oai-a"
    assert out.choices[0].finish_reason == ours["finish_reason"]
    assert out.usage.prompt_tokens == ours["usage"]["prompt_tokens"]
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.model_extra["loraplex"] == {"tenant": "oai-a", "task": "default", "adapter": "oai-a@v2",
                                              "version": 2, "version_by": "current", "fallback": None,
                                              "route": {"task": "default", "by": "default", "score": None}}

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model="oai-a", messages=messages, max_tokens=stack.new_tokens,
                                          temperature=0)
    ours = stack.ask("oai-a", {"messages": messages, "max_new_tokens": stack.new_tokens}).json()
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == ours["text"]
    assert chat.usage.prompt_tokens == ours["usage"]["prompt_tokens"]


def test_logprobs_parse_into_the_clients_types_and_equal_our_json_api(stack, tenants):
    """chat `logprobs`/`top_logprobs` and completions `logprobs` through TorchServe, parsed by the
    client into ChatCompletionTokenLogprob / Logprobs; the numbers are our JSON API's (whose values
    the service tests hold to PEFT teacher-forced)."""
    from openai.types.chat.chat_completion_token_logprob import ChatCompletionTokenLogprob, TopLogprob
    from openai.types.completion_choice import Logprobs

    client = _client(stack)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model="oai-a", messages=messages, max_tokens=stack.new_tokens,
                                          temperature=0, logprobs=True, top_logprobs=3)
    ours = stack.ask("oai-a", {"messages": messages, "max_new_tokens": stack.new_tokens, "logprobs": 3}).json()
    content = chat.choices[0].logprobs.content
    assert content and all(isinstance(c, ChatCompletionTokenLogprob) for c in content)
    assert len(content) == chat.usage.completion_tokens == ours["usage"]["completion_tokens"]
    assert [c.token for c in content] == ours["logprobs"]["tokens"]
    assert [c.logprob for c in content] == pytest.approx(ours["logprobs"]["token_logprobs"], abs=1e-4)
    for c in content:
        assert len(c.top_logprobs) == 3 and all(isinstance(a, TopLogprob) for a in c.top_logprobs)
        assert c.top_logprobs[0].token == c.token and c.bytes == list(c.token.encode())  # greedy: top-1

    out = client.completions.create(model="oai-a", prompt=PROMPT, max_tokens=stack.new_tokens, temperature=0,
                                    logprobs=2)
    ours = stack.ask("oai-a", {"prompt": PROMPT, "max_new_tokens": stack.new_tokens, "logprobs": 2}).json()
    lp = out.choices[0].logprobs
    assert isinstance(lp, Logprobs) and lp.tokens == ours["logprobs"]["tokens"]
    assert lp.token_logprobs == pytest.approx(ours["logprobs"]["token_logprobs"], abs=1e-4)
    assert len(lp.top_logprobs) == len(lp.text_offset) == out.usage.completion_tokens
    assert all(token in top and len(top) <= 3 for token, top in zip(lp.tokens, lp.top_logprobs))
    assert "logprobs" not in stack.ask("oai-a", {"prompt": PROMPT, "max_new_tokens": 2}).json()


def test_base_pinned_version_and_seeded_sampling(stack, tenants, tiny_adapters):
    client = _client(stack)
    args = {"prompt": PROMPT, "max_tokens": stack.new_tokens, "temperature": 0}
    base = client.completions.create(model="base", **args)
    assert base.choices[0].text == stack.expected(None, PROMPT)
    assert base.model_extra["loraplex"] == {"tenant": None, "task": None, "adapter": "base", "version": None,
                                               "version_by": None, "fallback": "no_tenant", "route": None}
    pinned = client.completions.create(model="oai-a@v1", **args)
    assert pinned.choices[0].text == stack.expected(tiny_adapters["a"], PROMPT)
    assert len({base.choices[0].text, pinned.choices[0].text, stack.expected(tiny_adapters["b"], PROMPT)}) == 3
    assert pinned.model_extra["loraplex"]["adapter"] == "oai-a@v1"
    sampled = [client.completions.create(model="oai-a", prompt=PROMPT, max_tokens=stack.new_tokens,
                                         temperature=0.9, seed=7).choices[0].text for _ in range(2)]
    ours = stack.ask("oai-a", {"prompt": PROMPT, "max_new_tokens": stack.new_tokens, "do_sample": True,
                               "temperature": 0.9, "seed": 7}).json()["text"]
    assert sampled == [ours, ours]


def test_errors_in_openai_shape_with_our_status(stack, tenants):
    client = _client(stack)
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.chat.completions.create(model="oai-off", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert e.value.status_code == 403 and "disabled" in e.value.message and e.value.code == "TenantDisabled"
    with pytest.raises(openai.PermissionDeniedError) as e:  # a stream that fails before its first chunk
        client.chat.completions.create(model="oai-off", messages=[{"role": "user", "content": "x"}], stream=True)
    assert e.value.status_code == 403 and e.value.code == "TenantDisabled"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="oai-a", prompt="x", max_tokens=10_000)
    assert "'max_tokens' is 10000" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # the header names another tenant than `model`
        _client(stack, default_headers={"X-Tenant-ID": "oai-off"}).completions.create(
            model="oai-a", prompt="x", max_tokens=2)
    assert e.value.code == "TenantConflict"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="oai-a", input="x")


def test_models_list(stack, tenants):
    assert [m.id for m in _client(stack).models.list()] == ["base"]
    mine = _client(stack, default_headers={"X-Tenant-ID": "oai-a"}).models.list()
    assert [m.id for m in mine] == ["base", "oai-a"]
    with pytest.raises(openai.PermissionDeniedError):
        _client(stack, default_headers={"X-Tenant-ID": "oai-off"}).models.list()


def test_tenant_key_travels_in_default_headers(stack, tenants):
    """The stack runs with require_tenant_key off (the service tests cover the 401s); an over-long
    X-Tenant-Key is refused by the handler, which shows the header reaches it."""
    good = _client(stack, default_headers={"X-Tenant-Key": tenants["key"]})
    assert good.completions.create(model="oai-a", prompt=PROMPT, max_tokens=2).choices[0].text is not None
    with pytest.raises(openai.BadRequestError) as e:
        _client(stack, default_headers={"X-Tenant-Key": "k" * 300}).completions.create(
            model="oai-a", prompt=PROMPT, max_tokens=2)
    assert "X-Tenant-Key" in e.value.message


def test_bad_openai_requests_fail_alone_in_their_batch(stack, tenants, tiny_adapters):
    client = _client(stack)
    want = stack.expected(tiny_adapters["b"], PROMPT)

    def good():
        return client.completions.create(model="oai-a", prompt=PROMPT, max_tokens=stack.new_tokens,
                                         temperature=0).choices[0].text

    def bad():
        with pytest.raises(openai.PermissionDeniedError):
            client.completions.create(model="oai-off", prompt=PROMPT, max_tokens=2)
        return "refused"

    def ours():
        return stack.ask("oai-a", {"prompt": PROMPT, "max_new_tokens": stack.new_tokens}).json()["text"]

    jobs = [good, bad, ours, good, bad, ours, good, good]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: job(), jobs))
    assert results == [want if job is not bad else "refused" for job in jobs]


def test_tasks_by_header_and_by_model(stack, tiny_adapters):
    """Issue 14 item 1 through TorchServe: `tenantctl onboard --task`, then X-Task on our JSON API and
    `model: "<tenant>:<task>"` (and a pinned "<tenant>:<task>@v<N>") with the openai client; each
    answer is PEFT's with the adapter of the task that must serve it (a, c and b differ)."""
    assert _onboard(stack, "oai-t", tiny_adapters["a"])["adapter_id"] == "oai-t@v1"
    for adapter, want_id in (("b", "oai-t:summarize@v2"), ("c", "oai-t:summarize@v3")):
        done = stack.tenantctl("onboard", "oai-t", str(tiny_adapters[adapter]), "--task", "summarize")
        assert done.returncode == 0 and json.loads(done.stdout)["adapter_id"] == want_id, done.stderr
    want = {k: stack.expected(tiny_adapters[k], PROMPT) for k in ("a", "b", "c")}
    assert len(set(want.values())) == 3, want  # the three adapters answer differently: the test can tell

    body = {"prompt": PROMPT, "max_new_tokens": stack.new_tokens}
    plain = stack.ask("oai-t", body).json()
    header = stack.ask("oai-t", body, headers={"X-Task": "summarize"}).json()
    field = stack.ask("oai-t", {**body, "task": "summarize"}).json()
    assert (plain["task"], plain["adapter"], plain["text"]) == ("default", "oai-t@v1", want["a"])
    for reply in (header, field):
        assert (reply["task"], reply["adapter"], reply["text"]) == ("summarize", "oai-t:summarize@v3", want["c"])
    missing = stack.ask("oai-t", body, headers={"X-Task": "translate"})
    assert missing.status_code == 404 and "'translate'" in missing.json()["error"], missing.text

    client = _client(stack)
    out = client.completions.create(model="oai-t:summarize", prompt=PROMPT, max_tokens=stack.new_tokens,
                                    temperature=0)
    assert out.choices[0].text == want["c"] and out.model == "oai-t:summarize"
    assert out.model_extra["loraplex"] == {"tenant": "oai-t", "task": "summarize", "adapter": "oai-t:summarize@v3",
                                           "version": 3, "version_by": "current", "fallback": None,
                                           "route": {"task": "summarize", "by": "header", "score": None}}
    pinned = client.completions.create(model="oai-t:summarize@v2", prompt=PROMPT, max_tokens=stack.new_tokens,
                                       temperature=0)
    assert pinned.choices[0].text == want["b"] and pinned.model_extra["loraplex"]["adapter"] == "oai-t:summarize@v2"
    by_header = client.completions.create(model="oai-t", prompt=PROMPT, max_tokens=stack.new_tokens, temperature=0,
                                          extra_headers={"X-Task": "summarize"})
    assert by_header.choices[0].text == want["c"]
    with pytest.raises(openai.NotFoundError) as ei:
        client.completions.create(model="oai-t:translate", prompt=PROMPT, max_tokens=2, temperature=0)
    assert "'translate'" in ei.value.body["message"]
    assert stack.tenantctl("disable", "oai-t").returncode == 0
    try:  # the worker drops its cached record when the change event lands (a moment after tenantctl exits)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.completions.create(model="oai-t:summarize", prompt=PROMPT, max_tokens=2, temperature=0)
            except openai.PermissionDeniedError:
                break
            assert time.monotonic() < deadline, "a disabled tenant's task kept being served"
            time.sleep(0.1)
    finally:
        assert stack.tenantctl("enable", "oai-t").returncode == 0
