"""The task router end to end (issue 14 item 2): a real TorchServe (tests/e2e/conftest.py's stack, the
tiny random model), tasks and their example prompts onboarded with the real `tenantctl onboard --examples`,
`tenantctl router ... classify`: a request that names no task is served by the task the router picks,
with PEFT's text for that task's adapter, and the reply's `route` says so (JSON API and OpenAI's
`loraplex` object); an explicit task still wins; `tenantctl router ... header` reaches the worker at
once (the policy event). The random model cannot rank unseen prompts, so each prompt is one task's
example (centred cosine 1 to its own task); accuracy is tests/demo/test_router_accuracy.py's."""
from __future__ import annotations

import json
import time

import pytest
import requests

pytestmark = pytest.mark.e2e

EXAMPLES = {"default": ["numbers 0 1 2 3 4 5"], "summarize": ["the quick brown fox jumps over the lazy dog."],
            "translate": ["What is the capital of France?"]}
ADAPTER_OF = {"default": "a", "summarize": "b", "translate": "c"}


def test_classify_router_through_torchserve(stack, tiny_adapters, tmp_path):
    tenant = "rt-acme"
    for i, (task, name) in enumerate(ADAPTER_OF.items()):
        f = tmp_path / f"{task}.examples"
        # one file as lines, the others as JSON lists: both forms of --examples
        f.write_text("\n".join(EXAMPLES[task]) + "\n" if i == 0 else json.dumps(EXAMPLES[task]))
        done = stack.tenantctl("onboard", tenant, str(tiny_adapters[name]), "--task", task, "--examples", str(f))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["examples"] == 1
    done = stack.tenantctl("router", tenant, "classify")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["router"] == "classify"

    new = stack.new_tokens
    for task, name in ADAPTER_OF.items():
        prompt = EXAMPLES[task][0]
        r = stack.ask(tenant, {"prompt": prompt, "max_new_tokens": new})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == task and body["route"]["task"] == task and body["route"]["by"] == "classify", body
        assert body["route"]["score"] == pytest.approx(1.0, abs=1e-3)
        assert body["text"] == stack.expected(tiny_adapters[name], prompt), task

    # an explicit task wins over the classifier
    prompt = EXAMPLES["summarize"][0]
    body = stack.ask(tenant, {"prompt": prompt, "max_new_tokens": new}, headers={"X-Task": "translate"}).json()
    assert body["task"] == "translate" and body["route"] == {"task": "translate", "by": "header", "score": None}
    assert body["text"] == stack.expected(tiny_adapters["c"], prompt)

    # the OpenAI API: the route is in the `loraplex` object
    r = requests.post(f"{stack.ts.inference_url}/predictions/loraplex/1.0/v1/completions", timeout=120,
                      headers={"Authorization": f"Bearer {stack.ts.keys()['inference']['key']}"},
                      json={"model": tenant, "prompt": EXAMPLES["translate"][0], "max_tokens": new, "temperature": 0})
    assert r.status_code == 200, r.text
    shown = r.json()["loraplex"]
    assert shown["task"] == "translate" and shown["route"]["by"] == "classify"

    # back to header routing: the next requests get the default task (the policy event reaches the worker)
    done = stack.tenantctl("router", tenant, "header")
    assert done.returncode == 0, done.stderr
    deadline, body = time.time() + 10, {}
    while time.time() < deadline:
        body = stack.ask(tenant, {"prompt": prompt, "max_new_tokens": new}).json()
        if body.get("route", {}).get("by") == "default":
            break
        time.sleep(0.1)
    assert body["task"] == "default" and body["route"] == {"task": "default", "by": "default", "score": None}
    assert body["text"] == stack.expected(tiny_adapters["a"], prompt)
