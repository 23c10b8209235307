"""Per-token log-probabilities through the service (real registry, tiny model, no TorchServe): our
JSON API's `logprobs` field against PEFT alone teacher-forced over the returned tokens (1e-4), cut
with the text at a stop string, refused when malformed, and absent unless asked."""
from __future__ import annotations

import pytest

from handler.service import RawRequest
from loraplex_testing.oracle import PeftOracle

TOL = 1e-4
PROMPT = "hello world"
NEW = 8


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, tiny_adapters):
    return PeftOracle(tiny_model_dir, {"a": tiny_adapters["a"]})


def _ask(headers=None, **fields):
    return RawRequest({"prompt": PROMPT, "max_new_tokens": NEW, **fields}, {"X-Tenant-ID": "acme"} if headers is None else headers)


@pytest.mark.parametrize("engine", ["multilora", "peft"])
def test_greedy_logprobs_equal_peft_alone(make_service, tools, tiny_adapters, oracle, engine):
    svc = make_service(engine=engine)
    tools.onboard(svc, "acme", tiny_adapters["a"])
    asked, plain, base = svc.handle_batch([_ask(logprobs=3), _ask(), _ask({}, logprobs=20)])
    assert asked.status == plain.status == base.status == 200, (asked.body, plain.body, base.body)
    assert "logprobs" not in plain.body and asked.body["text"] == plain.body["text"]
    prompt_ids = oracle.prompt_ids(PROMPT)
    for reply, adapter, k in ((asked, "a", 3), (base, None, 20)):
        lp = reply.body["logprobs"]
        ids = oracle.greedy(adapter, prompt_ids, NEW)
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids)
        assert reply.body["usage"]["completion_tokens"] == len(ids)
        assert lp["tokens"] == [svc.tokenizer.decode([i]) for i in ids]
        want = oracle.token_logprobs(adapter, prompt_ids, ids)
        for t, (tok, got, top) in enumerate(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])):
            assert abs(got - want[t, ids[t]].item()) < TOL, (t, got)
            assert len(top) == k and top[0]["token"] == tok  # greedy: the generated token is the top-1
            best = want[t].topk(k)
            assert [a["logprob"] for a in top] == pytest.approx(best.values.tolist(), abs=TOL)
            assert all(a["logprob"] >= b["logprob"] for a, b in zip(top, top[1:]))


def test_stop_cut_keeps_the_logprobs_of_the_kept_tokens(make_service, tools, tiny_adapters, oracle):
    svc = make_service()
    tools.onboard(svc, "acme", tiny_adapters["a"])
    ids = oracle.greedy("a", oracle.prompt_ids(PROMPT), NEW)
    assert len(ids) >= 4, "the tiny model must say enough for a cut"
    full_text = svc.tokenizer.decode(ids, skip_special_tokens=True)
    head = svc.tokenizer.decode(ids[:len(ids) - 2], skip_special_tokens=True)
    stop = full_text[len(head):][:3]
    assert stop, "the last two tokens must hold text"
    full, cut = svc.handle_batch([_ask(logprobs=2), _ask(logprobs=2, stop=[stop])])
    assert cut.status == 200 and cut.body["finish_reason"] == "stop"
    kept = cut.body["usage"]["completion_tokens"]
    assert kept <= len(ids) - 1 and cut.body["text"] == full_text[:full_text.find(stop)]
    lp, whole = cut.body["logprobs"], full.body["logprobs"]
    assert {name: len(v) for name, v in lp.items()} == dict.fromkeys(lp, kept)
    assert {name: v[:kept] for name, v in whole.items()} == lp


@pytest.mark.parametrize("value, words", [
    (True, "'logprobs' must be an integer"), (1.5, "'logprobs' must be an integer"),
    ("3", "'logprobs' must be an integer"), (-1, "'logprobs' must be between 0 and 20"),
    (21, "'logprobs' must be between 0 and 20"),
])
def test_bad_logprobs_is_400_alone_in_its_batch(make_service, tools, tiny_adapters, value, words):
    svc = make_service()
    tools.onboard(svc, "acme", tiny_adapters["a"])
    bad, none, good = svc.handle_batch([_ask(logprobs=value), _ask(logprobs=0), _ask(logprobs=1)])
    assert bad.status == 400 and words in bad.body["error"], bad.body
    assert none.status == 200 and "logprobs" not in none.body
    assert good.status == 200 and len(good.body["logprobs"]["tokens"]) == good.body["usage"]["completion_tokens"]


def test_openai_logprobs_are_our_logprobs(make_service, tools, tiny_adapters):
    svc = make_service(scheduler="static")  # one engine call: the two requests' log-probs are equal bit for bit
    tools.onboard(svc, "acme", tiny_adapters["a"])
    msgs = [{"role": "user", "content": PROMPT}]
    chat, ours_chat, comp, ours = svc.handle_batch([
        RawRequest({"model": "acme", "messages": msgs, "max_tokens": NEW, "temperature": 0, "logprobs": True,
                    "top_logprobs": 2}, {"url_path": "v1/chat/completions"}),
        RawRequest({"messages": msgs, "max_new_tokens": NEW, "logprobs": 2}, {"X-Tenant-ID": "acme"}),
        RawRequest({"model": "acme", "prompt": PROMPT, "max_tokens": NEW, "temperature": 0, "logprobs": 0},
                   {"url_path": "v1/completions"}),
        _ask(logprobs=1),
    ])
    assert all(r.status == 200 for r in (chat, ours_chat, comp, ours))
    content = chat.body["choices"][0]["logprobs"]["content"]
    mine = ours_chat.body["logprobs"]
    assert [c["token"] for c in content] == mine["tokens"]
    assert [c["logprob"] for c in content] == mine["token_logprobs"]
    assert [c["top_logprobs"] for c in content] == [
        [{**a, "bytes": list(a["token"].encode())} for a in top] for top in mine["top_logprobs"]]
    legacy, mine = comp.body["choices"][0]["logprobs"], ours.body["logprobs"]
    assert legacy["tokens"] == mine["tokens"] and legacy["token_logprobs"] == mine["token_logprobs"]
    assert legacy["top_logprobs"] == [{t: lp} for t, lp in zip(mine["tokens"], mine["token_logprobs"])]
    assert len(legacy["text_offset"]) == len(mine["tokens"]) and legacy["text_offset"][0] == 0
