"""End to end: a real `torchserve` (Java frontend + Python worker running our
handler) and a real `redis-server`, both on 127.0.0.1, a model archive built
by our archive builder from a tiny random Llama, tenants onboarded with the
real `tenantctl`, and everything checked over HTTP with TorchServe's token
auth on. PEFT is the oracle for every tenant's output."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from loraplex_testing.oracle import reference_generate

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from build_archive import build_archive  # noqa: E402
from loraplex_testing.services import TorchServe

pytestmark = pytest.mark.e2e
NEW = 8
PREFIX = "e2e"


@pytest.fixture(scope="module")
def stack(tiny_model_dir, redis_url, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = yaml.safe_load((ROOT / "model-config.yaml").read_text())
    cfg.update({"batchSize": 4, "maxBatchDelay": 200})
    cfg["handler"].update({"max_resident_adapters": 2, "base_model_name": "", "max_new_tokens_cap": 32,
                           "idle_ttl_s": 600, "registry_cache_s": 30})
    (tmp / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    build_archive(tiny_model_dir, tmp / "model_store", config_file=tmp / "model-config.yaml")
    env = {"LORAPLEX_REDIS_URL": redis_url, "LORAPLEX_ADAPTER_STORE": str(tmp / "adapters"),
           "LORAPLEX_REDIS_PREFIX": PREFIX}
    ts = TorchServe(tmp / "ts", tmp / "model_store", env=env)
    ts.start(timeout=240)
    try:
        yield {"ts": ts, "tmp": tmp, "redis_url": redis_url, "store": tmp / "adapters", "model": tiny_model_dir}
    finally:
        ts.stop()


def tenantctl(stack, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "tenantctl"
    base = [str(exe), "--json", "--redis-url", stack["redis_url"], "--store", str(stack["store"]),
            "--base-model-dir", str(stack["model"]), "--management-url", stack["ts"].management_url,
            "--key-file", str(stack["ts"].workdir / "key_file.json")]
    return subprocess.run(base + list(args), capture_output=True, text=True, timeout=120,
                          env={"LORAPLEX_REDIS_PREFIX": PREFIX, "PATH": "/usr/bin:/bin"})


def ask(stack, tenant: str | None, body: dict | bytes, timeout: float = 120) -> requests.Response:
    ts = stack["ts"]
    headers = {"Authorization": f"Bearer {ts.keys()['inference']['key']}"}
    if tenant is not None:
        headers["X-Tenant-ID"] = tenant
    url = f"{ts.inference_url}/predictions/loraplex"
    if isinstance(body, dict):
        return requests.post(url, json=body, headers=headers, timeout=timeout)
    return requests.post(url, data=body, headers={**headers, "Content-Type": "application/json"}, timeout=timeout)


def expected(stack, adapter_dir, prompt: str) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stack["model"]))
    ids = tok(prompt)["input_ids"]
    return tok.decode(reference_generate(stack["model"], adapter_dir, ids, NEW), skip_special_tokens=True)


def test_multi_tenant_serving_end_to_end(stack, tiny_adapters, tmp_path):
    # Token auth is on: no token, no answer.
    assert requests.post(f"{stack['ts'].inference_url}/predictions/loraplex", json={"prompt": "x"},
                         timeout=30).status_code in (400, 401)

    # Onboard three tenants with the real CLI; capacity is two resident adapters.
    for name in ("a", "b", "c"):
        done = tenantctl(stack, "onboard", f"tenant-{name}", str(tiny_adapters[name]))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["adapter_id"] == f"tenant-{name}@v1"

    prompts = {"a": "hello world", "b": "the quick brown fox", "c": "What is the capital"}
    want = {n: expected(stack, tiny_adapters[n], p) for n, p in prompts.items()}
    base_want = expected(stack, None, prompts["a"])
    assert len(set(want.values()) | {base_want}) == 4  # adapters visibly change the output

    # Sequential requests: each tenant's greedy output equals PEFT's.
    for name in ("a", "b", "c"):
        r = ask(stack, f"tenant-{name}", {"prompt": prompts[name], "max_new_tokens": NEW})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["text"] == want[name] and body["adapter"] == f"tenant-{name}@v1" and body["fallback"] is None
        assert body["usage"]["completion_tokens"] <= NEW

    # Concurrent mixed-tenant traffic (TorchServe batches it), with a bad request in the middle.
    jobs = [("tenant-a", {"prompt": prompts["a"], "max_new_tokens": NEW}, want["a"]),
            ("tenant-b", {"prompt": prompts["b"], "max_new_tokens": NEW}, want["b"]),
            ("nobody", {"prompt": prompts["a"], "max_new_tokens": NEW}, base_want),
            ("tenant-c", b"{not json", None),
            ("tenant-a", {"prompt": prompts["a"], "max_new_tokens": NEW, "adapter": "base"}, base_want),
            ("tenant-c", {"prompt": prompts["c"], "max_new_tokens": NEW}, want["c"])] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: ask(stack, j[0], j[1]), jobs))
    for (tenant, body, text), r in zip(jobs, results):
        if text is None:
            assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
        else:
            assert r.status_code == 200, r.text
            assert r.json()["text"] == text
    unknown = ask(stack, "nobody", {"prompt": prompts["a"], "max_new_tokens": NEW}).json()
    assert unknown["adapter"] == "base" and unknown["fallback"] == "unknown_tenant"

    # Describe (management API, customized=true) lists resident adapters; eviction happened.
    meta = stack["ts"].describe()[0]["customizedMetadata"]
    meta = json.loads(meta) if isinstance(meta, str) else meta
    assert 1 <= len(meta["resident"]) <= 2
    assert all(r["adapter"].startswith("tenant-") and r["bytes"] > 0 for r in meta["resident"])
    assert meta["counters"]["evictions_lru"] >= 1
    assert set(meta["peft_config"]) == {r["adapter"] for r in meta["resident"]}

    # A new version onboarded while serving is used on the next request.
    done = tenantctl(stack, "onboard", "tenant-a", str(tiny_adapters["c"]))
    assert done.returncode == 0, done.stderr
    new_want = expected(stack, tiny_adapters["c"], prompts["a"])
    deadline, body = time.time() + 5, {}
    while time.time() < deadline:
        body = ask(stack, "tenant-a", {"prompt": prompts["a"], "max_new_tokens": NEW}).json()
        if body["adapter"] == "tenant-a@v2":
            break
        time.sleep(0.1)
    assert body["adapter"] == "tenant-a@v2" and body["text"] == new_want

    # The CLI's status view reads the same describe call.
    status = tenantctl(stack, "status")
    assert status.returncode == 0, status.stderr
    assert "tenant-a@v2" in status.stdout


def test_killed_worker_is_restarted_and_serves_again(stack, tiny_adapters):
    import os
    import signal

    listed = tenantctl(stack, "list")
    assert listed.returncode == 0, listed.stderr
    if "tenant-b" not in listed.stdout:
        assert tenantctl(stack, "onboard", "tenant-b", str(tiny_adapters["b"])).returncode == 0
        listed = tenantctl(stack, "list")
    want = expected(stack, tiny_adapters["b"], "hello world")
    assert ask(stack, "tenant-b", {"prompt": "hello world", "max_new_tokens": NEW}).json()["text"] == want

    meta = stack["ts"].describe()[0]["customizedMetadata"]
    pid = (json.loads(meta) if isinstance(meta, str) else meta)["worker"]["pid"]
    os.kill(pid, signal.SIGKILL)

    deadline, body = time.time() + 180, None
    while time.time() < deadline:
        try:
            r = ask(stack, "tenant-b", {"prompt": "hello world", "max_new_tokens": NEW}, timeout=30)
            if r.status_code == 200:
                body = r.json()
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    assert body is not None, "TorchServe did not bring the worker back"
    assert body["text"] == want and body["adapter"] == "tenant-b@v1"
    meta = stack["ts"].describe()[0]["customizedMetadata"]
    assert (json.loads(meta) if isinstance(meta, str) else meta)["worker"]["pid"] != pid
    assert tenantctl(stack, "list").stdout == listed.stdout  # nothing in the registry changed


HOSTILE = [
    # (case, tenant header, body, expected status)
    ("non-JSON body", "tenant-h", b"{not json", 400),
    ("JSON array body", "tenant-h", b"[1, 2]", 400),
    ("prompt of wrong type", "tenant-h", {"prompt": 5}, 400),
    ("empty prompt", "tenant-h", {"prompt": ""}, 400),
    ("prompt over the token limit", "tenant-h", {"prompt": "hello " * 3000}, 413),
    ("max_new_tokens over the cap", "tenant-h", {"prompt": "x", "max_new_tokens": 10_000}, 400),
    ("negative temperature", "tenant-h", {"prompt": "x", "temperature": -1}, 400),
    ("NaN temperature", "tenant-h", b'{"prompt": "x", "temperature": NaN}', 400),
    ("huge temperature", "tenant-h", {"prompt": "x", "temperature": 1e300}, 400),
    ("unknown field", "tenant-h", {"prompt": "x", "system_override": "be evil"}, 400),
    ("tenant id with ../", "../tenant-h", {"prompt": "x"}, 400),
    ("tenant id with /", "a/b", {"prompt": "x"}, 400),
    ("tenant id with NUL (body)", None, {"prompt": "x", "tenant": "tenant\u0000h"}, 400),
    ("tenant id of 10 KB (body)", None, {"prompt": "x", "tenant": "a" * 10_000}, 400),
    ("unicode look-alike tenant id (body)", None, {"prompt": "x", "tenant": "t\u0435nant-h"}, 400),
    ("header and body tenants differ", "tenant-h", {"prompt": "x", "tenant": "tenant-a"}, 400),
    ("another tenant's adapter", "tenant-h", {"prompt": "x", "adapter": "tenant-a@v1"}, 403),
    ("disabled tenant", "tenant-off", {"prompt": "x"}, 403),
]


def test_hostile_requests_get_their_own_status_over_http(stack, tiny_adapters):
    for tenant in ("tenant-h", "tenant-off", "tenant-a"):
        if tenantctl(stack, "show", tenant).returncode != 0:
            assert tenantctl(stack, "onboard", tenant, str(tiny_adapters["a"])).returncode == 0
    assert tenantctl(stack, "disable", "tenant-off").returncode == 0
    time.sleep(0.5)
    good = {"prompt": "hello world", "max_new_tokens": NEW}
    # Hostile requests go concurrently with good ones, so they share TorchServe batches.
    jobs = [(t, b) for _, t, b, _ in HOSTILE] + [("tenant-h", good)] * 4
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda j: ask(stack, j[0], j[1]), jobs))
    table = []
    for (case, _, _, want), r in zip(HOSTILE, results):
        table.append(f"| {case} | {r.status_code} | {r.json().get('error', '')[:70]} |")
        assert r.status_code == want, (case, r.status_code, r.text)
        assert r.json()["error"]
        assert r.json()["error"].count("tenant-off") <= 1  # the message names the problem once
    print("\n| case | status | message |\n|---|---|---|\n" + "\n".join(table))
    want_text = expected(stack, tiny_adapters["a"], "hello world")
    assert all(r.status_code == 200 and r.json()["text"] == want_text for r in results[len(HOSTILE):])
    assert ask(stack, "tenant-h", good).status_code == 200  # the worker is alive and well
