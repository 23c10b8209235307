"""End to end: a real `torchserve` (Java frontend + Python worker running our
handler) and a real `redis-server`, both on 127.0.0.1, a model archive built
by our archive builder from a tiny random Llama, tenants onboarded with the
real `tenantctl`, and everything checked over HTTP with TorchServe's token
auth on. PEFT is the oracle for every tenant's output. The stack (tests/e2e/
conftest.py) is shared by the session, so each test names its own tenants."""
from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

pytestmark = pytest.mark.e2e


def test_multi_tenant_serving_end_to_end(stack, tiny_adapters):
    new = stack.new_tokens
    # Token auth is on: no token, no answer.
    assert requests.post(f"{stack.ts.inference_url}/predictions/loraplex", json={"prompt": "x"},
                         timeout=30).status_code in (400, 401)

    # Onboard three tenants with the real CLI; capacity is two resident adapters.
    for name in ("a", "b", "c"):
        done = stack.tenantctl("onboard", f"serve-{name}", str(tiny_adapters[name]))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["adapter_id"] == f"serve-{name}@v1"

    prompts = {"a": "hello world", "b": "the quick brown fox", "c": "What is the capital"}
    want = {n: stack.expected(tiny_adapters[n], p) for n, p in prompts.items()}
    base_want = stack.expected(None, prompts["a"])
    assert len(set(want.values()) | {base_want}) == 4  # adapters visibly change the output

    # Sequential requests: each tenant's greedy output equals PEFT's.
    for name in ("a", "b", "c"):
        r = stack.ask(f"serve-{name}", {"prompt": prompts[name], "max_new_tokens": new})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["text"] == want[name] and body["adapter"] == f"serve-{name}@v1" and body["fallback"] is None
        assert body["usage"]["completion_tokens"] <= new

    # Concurrent mixed-tenant traffic (TorchServe batches it), with a bad request in the middle.
    jobs = [("serve-a", {"prompt": prompts["a"], "max_new_tokens": new}, want["a"]),
            ("serve-b", {"prompt": prompts["b"], "max_new_tokens": new}, want["b"]),
            ("nobody", {"prompt": prompts["a"], "max_new_tokens": new}, base_want),
            ("serve-c", b"{not json", None),
            ("serve-a", {"prompt": prompts["a"], "max_new_tokens": new, "adapter": "base"}, base_want),
            ("serve-c", {"prompt": prompts["c"], "max_new_tokens": new}, want["c"])] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: stack.ask(j[0], j[1]), jobs))
    for (tenant, body, text), r in zip(jobs, results):
        if text is None:
            assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
        else:
            assert r.status_code == 200, r.text
            assert r.json()["text"] == text
    unknown = stack.ask("nobody", {"prompt": prompts["a"], "max_new_tokens": new}).json()
    assert unknown["adapter"] == "base" and unknown["fallback"] == "unknown_tenant"

    # Describe (management API, customized=true) lists resident adapters; eviction happened.
    meta = stack.ts.describe()[0]["customizedMetadata"]
    meta = json.loads(meta) if isinstance(meta, str) else meta
    assert 1 <= len(meta["resident"]) <= 2
    assert all(r["adapter"].startswith("serve-") and r["bytes"] > 0 for r in meta["resident"])
    assert meta["counters"]["evictions_lru"] >= 1
    assert set(meta["peft_config"]) == {r["adapter"] for r in meta["resident"]}

    # A new version onboarded while serving is used on the next request.
    done = stack.tenantctl("onboard", "serve-a", str(tiny_adapters["c"]))
    assert done.returncode == 0, done.stderr
    new_want = stack.expected(tiny_adapters["c"], prompts["a"])
    deadline, body = time.time() + 5, {}
    while time.time() < deadline:
        body = stack.ask("serve-a", {"prompt": prompts["a"], "max_new_tokens": new}).json()
        if body["adapter"] == "serve-a@v2":
            break
        time.sleep(0.1)
    assert body["adapter"] == "serve-a@v2" and body["text"] == new_want

    # The CLI's status view reads the same describe call.
    status = stack.tenantctl("status")
    assert status.returncode == 0, status.stderr
    assert "serve-a@v2" in status.stdout


def test_killed_worker_is_restarted_and_serves_again(stack, tiny_adapters):
    new = stack.new_tokens
    listed = stack.tenantctl("list")
    assert listed.returncode == 0, listed.stderr
    if "restart-b" not in listed.stdout:
        assert stack.tenantctl("onboard", "restart-b", str(tiny_adapters["b"])).returncode == 0
        listed = stack.tenantctl("list")
    want = stack.expected(tiny_adapters["b"], "hello world")
    assert stack.ask("restart-b", {"prompt": "hello world", "max_new_tokens": new}).json()["text"] == want

    meta = stack.ts.describe()[0]["customizedMetadata"]
    pid = (json.loads(meta) if isinstance(meta, str) else meta)["worker"]["pid"]
    os.kill(pid, signal.SIGKILL)

    deadline, body = time.time() + 180, None
    while time.time() < deadline:
        try:
            r = stack.ask("restart-b", {"prompt": "hello world", "max_new_tokens": new}, timeout=30)
            if r.status_code == 200:
                body = r.json()
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    assert body is not None, "TorchServe did not bring the worker back"
    assert body["text"] == want and body["adapter"] == "restart-b@v1"
    meta = stack.ts.describe()[0]["customizedMetadata"]
    assert (json.loads(meta) if isinstance(meta, str) else meta)["worker"]["pid"] != pid
    assert stack.tenantctl("list").stdout == listed.stdout  # nothing in the registry changed


def test_a_second_instance_shares_the_machine_without_touching_the_first(stack, tiny_adapters, tmp_path):
    """Two TorchServes side by side (as a demo and a test run, or scale-out instances): each has its
    own worker socket, gRPC and worker ports; stopping one leaves the other serving."""
    from loraplex_testing.services import TorchServe

    if stack.tenantctl("show", "share-a").returncode != 0:
        assert stack.tenantctl("onboard", "share-a", str(tiny_adapters["a"])).returncode == 0
    body = {"prompt": "hello world", "max_new_tokens": stack.new_tokens, "adapter": "base"}
    first_before = stack.ask("share-a", body)
    assert first_before.status_code == 200, first_before.text

    second = TorchServe(tmp_path / "ts2", stack.tmp / "model_store", env=stack.ts.env)
    try:
        second.start(timeout=240)
        assert stack.ts.tmpdir != second.tmpdir
        assert all(list(ts.tmpdir.glob(".ts.sock.*")) for ts in (stack.ts, second))  # each worker's own socket
        ports = [ts.private_ports for ts in (stack.ts, second)]
        assert ports[0]["grpc_inference_port"] != ports[1]["grpc_inference_port"]
        assert ports[0]["initial_worker_port"] != ports[1]["initial_worker_port"]
        key = second.keys()["inference"]["key"]
        r = requests.post(f"{second.inference_url}/predictions/loraplex", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {key}", "X-Tenant-ID": "share-a"})
        assert r.status_code == 200 and r.json()["text"] == first_before.json()["text"]
    finally:
        second.stop()
    assert stack.ts.tmpdir.is_dir() and list(stack.ts.tmpdir.glob(".ts.sock.*"))  # its socket is still there
    after = stack.ask("share-a", body)
    assert after.status_code == 200 and after.json()["text"] == first_before.json()["text"]
