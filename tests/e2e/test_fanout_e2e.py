"""Fallback chains and compare mode end to end (issue 14 items 4-5): the shared real TorchServe
(continuous scheduler) and Redis, tasks onboarded and the chain set with the real `tenantctl`.
Compare's rows equal the same links asked one by one (and PEFT's text); a chain whose first link is
made unconfident (the threshold above its score) is answered by the next, its rows admitted as ONE
admission of the scheduler (describe's counters)."""
from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.e2e
TENANT = "fan-acme"
PROMPT = "hello world"


@pytest.fixture(scope="module")
def fan(stack, tiny_adapters):
    """fan-acme: default v1 = adapter a, summarize v2 = adapter b."""
    for adapter, task in (("a", "default"), ("b", "summarize")):
        done = stack.tenantctl("onboard", TENANT, str(tiny_adapters[adapter]), "--task", task)
        assert done.returncode == 0, done.stderr
    return stack


def _ask(stack, **fields):
    r = stack.ask(TENANT, {"prompt": PROMPT, "max_new_tokens": stack.new_tokens, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def _until(stack, ok, **fields):
    """Ask until `ok(body)`: a registry change reaches the worker by an event, a moment after tenantctl."""
    deadline = time.monotonic() + 15
    while True:
        body = _ask(stack, **fields)
        if ok(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def _scheduler(stack) -> dict:
    meta = stack.ts.describe()[0]["customizedMetadata"]
    return (json.loads(meta) if isinstance(meta, str) else meta)["scheduler"]


def test_compare_through_torchserve_equals_the_separate_runs(fan, tiny_adapters):
    stack = fan
    body = _ask(stack, compare=["base", "v1", "summarize"], logprobs=1)
    rows = body["compare"]
    assert [(r["link"], r["adapter"]) for r in rows] == [("base", "base"), ("v1", f"{TENANT}@v1"),
                                                         ("summarize", f"{TENANT}:summarize@v2")]
    pins = {"base": "base", "v1": f"{TENANT}@v1", "summarize": f"{TENANT}:summarize@v2"}
    peft = {"base": None, "v1": tiny_adapters["a"], "summarize": tiny_adapters["b"]}
    for row in rows:
        alone = _ask(stack, adapter=pins[row["link"]], logprobs=1)
        assert row["text"] == alone["text"] == stack.expected(peft[row["link"]], PROMPT), row["link"]
        assert row["logprobs"]["tokens"] == alone["logprobs"]["tokens"]
        gaps = [abs(a - b) for a, b in zip(row["logprobs"]["token_logprobs"], alone["logprobs"]["token_logprobs"])]
        assert max(gaps) < 1e-4, (row["link"], gaps)
    assert len({r["text"] for r in rows}) == 3
    r = stack.ask(TENANT, {"prompt": PROMPT, "compare": ["base", "other-tenant:summarize@v2"]})
    assert r.status_code == 403, r.text
    r = stack.ask(TENANT, {"prompt": PROMPT, "compare": ["base"], "stream": True})
    assert r.status_code == 400 and "stream" in r.json()["error"], r.text


def test_chain_through_torchserve_falls_through_an_unconfident_first_link(fan, tiny_adapters):
    stack = fan

    def chain(*args):
        done = stack.tenantctl("chain", TENANT, *args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    chain("summarize", "default", "base", "--threshold=-1e9")  # everybody is confident
    scores = {link["link"]: link["score"] for link in _until(stack, lambda b: "chain" in b)["chain"]["links"]}
    first, second = sorted(["summarize", "default"], key=scores.get)  # the less confident link first
    assert scores[second] - scores[first] > 1e-3, scores
    chain(first, second, "base", f"--threshold={(scores[first] + scores[second]) / 2!r}")
    try:
        _until(stack, lambda b: [link["link"] for link in b["chain"]["links"]] == [first, second, "base"])
        admitted = _scheduler(stack)["admitted"]
        body = _ask(stack)
        assert body["chain"]["answered_by"] == second, body["chain"]
        assert [link["link"] for link in body["chain"]["links"]] == [first, second, "base"]
        peft = {"default": tiny_adapters["a"], "summarize": tiny_adapters["b"]}
        assert body["text"] == stack.expected(peft[second], PROMPT)
        assert body["adapter"] == {"default": f"{TENANT}@v1", "summarize": f"{TENANT}:summarize@v2"}[second]
        assert _scheduler(stack)["admitted"] == admitted + 1  # three rows, one admission: one batch
        r = stack.ask(TENANT, {"prompt": PROMPT, "max_new_tokens": stack.new_tokens, "stream": True})
        lines = [json.loads(x) for x in r.content.decode("utf-8").splitlines() if x]
        assert r.status_code == 200 and "".join(x.get("text", "") for x in lines) == body["text"]
        assert lines[-1]["adapter"] == body["adapter"]
    finally:
        chain("--clear")
    assert "chain" not in _until(stack, lambda b: "chain" not in b)
