"""Setting a fallback chain (issue 14 item 4) through `tenantctl chain` and the onboarding service's
`/tenants/<t>/chain` (real Redis): set, show, clear, and the refusals (no base at the end, an unknown
task or version, no threshold, more links than max_fanout_rows, an unknown tenant), each writing
nothing, with the CLI's exit codes and the HTTP statuses."""
from __future__ import annotations

import itertools
import json

import pytest

from loraplex_common.config import LoraplexConfig
from tenant_registry import cli
from tenant_registry.http_api import OnboardingApi, Request
from tenant_registry.onboarding import onboard
from tenant_registry.registry import TenantRegistry
from tenant_registry.store import AdapterStore
from tenant_registry.validate import BaseModelSpec

_prefixes = itertools.count()
TOKEN = "mgmt-token"


@pytest.fixture
def env(redis_url, tmp_path, tiny_model_dir, tiny_adapters, monkeypatch):
    """acme with tasks default (v1) and summarize (v2); the CLI's flags and the HTTP api."""
    prefix = f"chainctl{next(_prefixes)}"
    for name in list(__import__("os").environ):
        if name.startswith("LORAPLEX_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LORAPLEX_REDIS_PREFIX", prefix)
    config = LoraplexConfig.from_mapping({"redis_url": redis_url, "redis_prefix": prefix,
                                          "adapter_store": str(tmp_path / "store"),
                                          "base_model_dir": str(tiny_model_dir)})
    registry, store = TenantRegistry(redis_url, prefix), AdapterStore(tmp_path / "store")
    spec = BaseModelSpec.from_model_dir(tiny_model_dir)
    onboard(registry, store, spec, "acme", tiny_adapters["a"], config)
    onboard(registry, store, spec, "acme", tiny_adapters["b"], config, task="summarize")
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"management": {"key": TOKEN}}))
    flags = ["--redis-url", redis_url, "--store", str(tmp_path / "store"), "--base-model-dir", str(tiny_model_dir)]
    return registry, config, flags, OnboardingApi(config, key_file=key_file)


def _ctl(capsys, flags, *args):
    rc = cli.main(["--json", *flags, *args])
    out = capsys.readouterr().out
    return rc, json.loads(out) if out.strip() else None


def test_tenantctl_chain_sets_shows_and_clears(env, capsys):
    registry, _, flags, _ = env
    rc, doc = _ctl(capsys, flags, "chain", "acme", "summarize@v2", "default", "base", "--threshold", "-1.5")
    assert rc == 0, doc
    assert doc == {"tenant": "acme", "chain": ["summarize@v2", "default", "base"], "chain_threshold": -1.5}
    policy = registry.get_policy("acme")
    assert [(c.task, c.version, c.base) for c in policy.chain] == [("summarize", 2, False), ("default", None, False),
                                                                    ("default", None, True)]
    assert _ctl(capsys, flags, "chain", "acme") == (0, doc)
    rc, doc = _ctl(capsys, flags, "chain", "acme", "--clear")
    assert rc == 0 and doc["chain"] == [] and doc["chain_threshold"] is None
    assert registry.get_policy("acme").chain == ()


@pytest.mark.parametrize("args, code, words", [
    (("summarize", "default", "--threshold", "-1"), 2, "base"),           # must end with base
    (("nosuch", "base", "--threshold", "-1"), 2, "nosuch"),               # a task acme does not have
    (("summarize@v7", "base", "--threshold", "-1"), 2, "v7"),             # a version it does not have
    (("summarize", "base"), 2, "threshold"),                              # no threshold
    (("summarize", "base", "--threshold", "nan"), 2, "finite"),
    (tuple(["default"] * 8 + ["base", "--threshold", "-1"]), 2, "max_fanout_rows"),
    (("Bad!", "base", "--threshold", "-1"), 2, "task"),
    (("base", "--clear"), 2, "--clear"),
])
def test_tenantctl_chain_refusals_write_nothing(env, capsys, args, code, words):
    registry, _, flags, _ = env
    rc, doc = _ctl(capsys, flags, "chain", "acme", *args)
    assert rc == code and words in doc["error"]["message"], doc
    assert registry.get_policy("acme").chain == ()


def test_tenantctl_chain_of_an_unknown_tenant_is_not_found(env, capsys):
    _, _, flags, _ = env
    assert _ctl(capsys, flags, "chain", "nobody")[0] == cli.EXIT_NOT_FOUND
    assert _ctl(capsys, flags, "chain", "nobody", "base", "--threshold", "-1")[0] == cli.EXIT_NOT_FOUND


def _http(api, method, path, *, query=None, body=b"", token=TOKEN, ctype="application/json"):
    headers = {"authorization": [f"Bearer {token}"]} if token else {}
    if body:
        headers["content-type"] = [ctype]
    return api.handle(Request(method, path, query or {}, headers, body))


def test_http_chain_endpoint(env):
    registry, _, _, api = env
    r = _http(api, "POST", "/tenants/acme/chain", query={"links": "summarize,base", "threshold": "-2"})
    assert r.status == 200 and r.doc == {"tenant": "acme", "chain": ["summarize", "base"], "chain_threshold": -2.0}
    assert _http(api, "GET", "/tenants/acme/chain").doc == r.doc
    r = _http(api, "PUT", "/tenants/acme/chain",
              body=json.dumps({"links": ["default", "summarize@v2", "base"], "threshold": -0.5}).encode())
    assert r.status == 200 and r.doc["chain"] == ["default", "summarize@v2", "base"]
    assert [c.task for c in registry.get_policy("acme").chain[:2]] == ["default", "summarize"]
    r = _http(api, "DELETE", "/tenants/acme/chain")
    assert r.status == 200 and r.doc["chain"] == [] and registry.get_policy("acme").chain == ()


@pytest.mark.parametrize("method, path, query, body, status", [
    ("POST", "/tenants/acme/chain", {"links": "summarize", "threshold": "-1"}, b"", 400),       # no base
    ("POST", "/tenants/acme/chain", {"links": "nosuch,base", "threshold": "-1"}, b"", 400),
    ("POST", "/tenants/acme/chain", {"links": "summarize,base"}, b"", 400),                     # no threshold
    ("POST", "/tenants/acme/chain", {"links": "summarize,base", "threshold": "low"}, b"", 400),
    ("POST", "/tenants/acme/chain", {}, b'{"links": ["base"], "threshold": true}', 400),
    ("POST", "/tenants/acme/chain", {}, b'{"links": "base", "threshold": -1}', 400),
    ("POST", "/tenants/acme/chain", {"what": "x"}, b"", 400),
    ("POST", "/tenants/nobody/chain", {"links": "base", "threshold": "-1"}, b"", 404),
    ("GET", "/tenants/nobody/chain", {}, b"", 404),
    ("PATCH", "/tenants/acme/chain", {}, b"", 405),
])
def test_http_chain_refusals_write_nothing(env, method, path, query, body, status):
    registry, _, _, api = env
    r = _http(api, method, path, query=query, body=body)
    assert r.status == status, r.doc
    assert registry.get_policy("acme").chain == ()


def test_http_chain_needs_the_management_token(env):
    _, _, _, api = env
    assert _http(api, "GET", "/tenants/acme/chain", token=None).status == 401
    assert _http(api, "POST", "/tenants/acme/chain", token="wrong",
                 query={"links": "base", "threshold": "-1"}).status == 401
