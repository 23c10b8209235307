"""A/B split end to end (issue 14 item 3): the real `tenantctl split` against the shared TorchServe
stack (tests/e2e/conftest.py). Both versions serve, each user (X-User-ID) keeps one version, and
which adapter served is checked by the reply's log-probs against PEFT with that version's adapter,
not only by its label; `--clear` and `rollback` are followed by the worker at once."""
from __future__ import annotations

import json
import time

import pytest

from loraplex_testing.oracle import PeftOracle

pytestmark = pytest.mark.e2e
TENANT = "abe2e"
PROMPT = "hello world"
NEW = 4
TOL = 1e-4


@pytest.fixture(scope="module")
def expected(stack, tiny_adapters):
    """version -> (PEFT's greedy token ids, their log-probs) with that version's adapter."""
    oracle = PeftOracle(stack.model, {"a": tiny_adapters["a"], "b": tiny_adapters["b"]})
    ids = oracle.prompt_ids(PROMPT)
    out = {}
    for version, name in ((1, "a"), (2, "b")):
        greedy = oracle.greedy(name, ids, NEW)
        lp = oracle.token_logprobs(name, ids, greedy)
        out[version] = [lp[t, greedy[t]].item() for t in range(NEW)]
    assert max(abs(x - y) for x, y in zip(out[1], out[2])) > 100 * TOL  # the versions are told apart
    return out


def _ask(stack, user):
    r = stack.ask(TENANT, {"prompt": PROMPT, "max_new_tokens": NEW, "logprobs": 1}, headers={"X-User-ID": user})
    assert r.status_code == 200, r.text
    return r.json()


def _served(stack, expected, user) -> tuple[int, str]:
    """(version, version_by) of one reply, after checking its log-probs are that version's."""
    body = _ask(stack, user)
    version = body["version"]
    assert body["adapter"] == f"{TENANT}@v{version}"
    got = body["logprobs"]["token_logprobs"]
    assert len(got) == NEW and max(abs(g - w) for g, w in zip(got, expected[version])) < TOL, (version, got)
    return version, body["version_by"]


def _ctl(stack, *args):
    done = stack.tenantctl(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def _eventually(fn, want, timeout=5.0):
    """fn() until it returns `want` (the worker follows the registry event within milliseconds)."""
    deadline = time.time() + timeout
    while (got := fn()) != want and time.time() < deadline:
        time.sleep(0.05)
    return got


def test_split_through_torchserve(stack, tiny_adapters, expected):
    for name in ("a", "b"):
        _ctl(stack, "onboard", TENANT, str(tiny_adapters[name]))
    users = [f"e2e-user-{i}" for i in range(16)]
    assert {_served(stack, expected, u) for u in users[:3]} == {(2, "current")}

    doc = _ctl(stack, "split", TENANT, "--task", "default", "v1=50", "v2=50")
    assert doc["splits"] == {"default": [{"version": 1, "weight": 50}, {"version": 2, "weight": 50}]}
    probe = users[0]
    _eventually(lambda: _served(stack, expected, probe)[1], "split")
    first = {u: _served(stack, expected, u) for u in users}
    assert {by for _, by in first.values()} == {"split"}
    assert {v for v, _ in first.values()} == {1, 2}  # both versions served (16 users, 50/50)
    again = {u: _served(stack, expected, u) for u in reversed(users)}
    assert again == first  # sticky: no user switched
    meta = stack.ts.describe()[0]["customizedMetadata"]
    counts = (json.loads(meta) if isinstance(meta, str) else meta)["splits"][TENANT]["default"]
    assert sum(counts.values()) >= 2 * len(users) and set(counts) == {"v1", "v2"}

    _ctl(stack, "split", TENANT, "--clear")
    on_v1 = next(u for u, (v, _) in first.items() if v == 1)
    assert _eventually(lambda: _served(stack, expected, on_v1), (2, "current")) == (2, "current")
    assert {_served(stack, expected, u) for u in users} == {(2, "current")}

    _ctl(stack, "split", TENANT, "v1=50", "v2=50")
    assert _eventually(lambda: _served(stack, expected, on_v1), (1, "split")) == (1, "split")
    _ctl(stack, "rollback", TENANT)  # v2 -> v1, and the rollback ends the split
    on_v2 = next(u for u, (v, _) in first.items() if v == 2)
    assert _eventually(lambda: _served(stack, expected, on_v2), (1, "current")) == (1, "current")
    assert {_served(stack, expected, u) for u in users} == {(1, "current")}
    assert _ctl(stack, "split", TENANT)["splits"] == {}


def test_a_90_10_split_over_1000_requests_through_torchserve(stack, tiny_adapters):
    """1,000 requests, one per end user (X-User-ID), through TorchServe on a 90/10 split: v1's share
    within 90 ± 3 points (the per-user draw is sha256-based, so the run is repeatable), and 100 of
    those users asked again each get the version they got before. The describe counters count them."""
    from concurrent.futures import ThreadPoolExecutor

    tenant = "ab1k"
    for name in ("a", "b"):
        _ctl(stack, "onboard", tenant, str(tiny_adapters[name]))
    _ctl(stack, "split", tenant, "v1=90", "v2=10")

    def version(user: str) -> int:
        r = stack.ask(tenant, {"prompt": PROMPT, "max_new_tokens": 1}, headers={"X-User-ID": user})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["adapter"] == f"{tenant}@v{body['version']}", body
        return body["version"] if body["version_by"] == "split" else -1

    assert _eventually(lambda: version("probe") > 0, True)
    users = [f"user-{i}" for i in range(1000)]
    with ThreadPoolExecutor(16) as pool:
        got = dict(zip(users, pool.map(version, users)))
        assert set(got.values()) == {1, 2}
        share = sum(v == 1 for v in got.values()) / len(got)
        assert 0.87 <= share <= 0.93, share
        again = dict(zip(users[::10], pool.map(version, users[::10])))
    assert all(again[u] == got[u] for u in again)  # sticky
    meta = stack.ts.describe()[0]["customizedMetadata"]
    counts = (json.loads(meta) if isinstance(meta, str) else meta)["splits"][tenant]["default"]
    assert counts["v1"] + counts["v2"] >= 1100 and counts["v2"] >= 1100 * 0.07
    _ctl(stack, "remove", tenant)
