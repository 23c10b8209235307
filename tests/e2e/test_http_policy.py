"""Hostile requests over real HTTP (TorchServe + the handler): each gets its own
status while good requests in the same TorchServe batches are served."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.e2e


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
        if stack.tenantctl("show", tenant).returncode != 0:
            assert stack.tenantctl("onboard", tenant, str(tiny_adapters["a"])).returncode == 0
    assert stack.tenantctl("disable", "tenant-off").returncode == 0
    time.sleep(0.5)
    good = {"prompt": "hello world", "max_new_tokens": stack.new_tokens}
    # Hostile requests go concurrently with good ones, so they share TorchServe batches.
    jobs = [(t, b) for _, t, b, _ in HOSTILE] + [("tenant-h", good)] * 4
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda j: stack.ask(j[0], j[1]), jobs))
    table = []
    for (case, _, _, want), r in zip(HOSTILE, results):
        table.append(f"| {case} | {r.status_code} | {r.json().get('error', '')[:70]} |")
        assert r.status_code == want, (case, r.status_code, r.text)
        assert r.json()["error"]
        assert r.json()["error"].count("tenant-off") <= 1  # the message names the problem once
    print("\n| case | status | message |\n|---|---|---|\n" + "\n".join(table))
    want_text = stack.expected(tiny_adapters["a"], "hello world")
    assert all(r.status_code == 200 and r.json()["text"] == want_text for r in results[len(HOSTILE):])
    assert stack.ask("tenant-h", good).status_code == 200  # the worker is alive and well
