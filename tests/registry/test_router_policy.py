"""The task router's control plane (issue 14 item 2), real Redis: `tenantctl onboard --examples FILE`
(lines or a JSON list) and `tenantctl router TENANT classify|header [--task T --examples FILE]`, and the
same through the onboarding HTTP API (in process: a JSON body, the query, a multipart `examples` part,
`/tenants/<t>/router`). A bad examples file or body is refused with nothing written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import urllib3

from loraplex_common.config import LoraplexConfig
from tenant_registry.http_api import OnboardingApi, Request
from tenant_registry.onboarding import parse_examples
from tenant_registry.errors import PolicyInvalid
from tenant_registry.registry import TenantRegistry

from .util import keys_under

TENANTCTL = Path(sys.executable).parent / "tenantctl"


def test_parse_examples_lines_or_json_list():
    assert parse_examples("  sum this up \n\n\nsummarize: x\n") == ("sum this up", "summarize: x")
    assert parse_examples('["one", " two "]') == ("one", "two")
    assert parse_examples('{"a": 1}') == ('{"a": 1}',)  # not a list: a line, one prompt
    for bad in ("", "  \n ", "[1, 2]", "[not json", '["ok", null]'):
        with pytest.raises(PolicyInvalid):
            parse_examples(bad)


@pytest.fixture
def ctl(redis_url, prefix, tmp_path, tiny_model_dir):
    mc = tmp_path / "model-config.yaml"
    mc.write_text(f"minWorkers: 1\nhandler:\n  redis_prefix: {prefix}\n  max_rank: 16\n"
                  f"  adapter_store: {tmp_path / 'store'}\n  base_model_dir: {tiny_model_dir}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env["LORAPLEX_REDIS_URL"] = redis_url

    def run(*args: str) -> tuple[int, dict | None]:
        p = subprocess.run([str(TENANTCTL), "--json", "--model-config", str(mc), *args], capture_output=True,
                           text=True, env=env, timeout=60)
        return p.returncode, json.loads(p.stdout) if p.stdout.strip() else None
    return run


def test_tenantctl_examples_and_router(ctl, registry, raw_redis, prefix, tiny_adapters, tmp_path):
    lines = tmp_path / "sum.txt"
    lines.write_text("Summarize this article.\n\nGive me the gist of this email.\n")
    as_json = tmp_path / "tr.json"
    as_json.write_text(json.dumps(["Translate into French: hello", "How do you say cat in Spanish?"]))
    rc, doc = ctl("onboard", "acme", str(tiny_adapters["a"]))
    assert rc == 0 and "examples" not in doc
    rc, doc = ctl("onboard", "acme", str(tiny_adapters["b"]), "--task", "summarize", "--examples", str(lines))
    assert rc == 0 and doc["examples"] == 2
    rc, doc = ctl("onboard", "acme", str(tiny_adapters["c"]), "--task", "translate", "--examples", str(as_json))
    assert rc == 0 and doc["examples"] == 2
    assert registry.get_policy("acme").router == "header"
    rc, doc = ctl("router", "acme", "classify")
    assert rc == 0 and doc["router"] == "classify"
    assert doc["examples"] == {"summarize": ["Summarize this article.", "Give me the gist of this email."],
                               "translate": ["Translate into French: hello", "How do you say cat in Spanish?"]}
    rc, doc = ctl("router", "acme", "--task", "default", "--examples", str(lines))
    assert rc == 0 and doc["router"] == "classify" and set(doc["examples"]) == {"default", "summarize", "translate"}
    policy = registry.get_policy("acme")
    assert policy.router == "classify" and policy.examples["default"] == ("Summarize this article.",
                                                                          "Give me the gist of this email.")
    rc, doc = ctl("router", "acme")  # show
    assert rc == 0 and doc["router"] == "classify"
    rc, doc = ctl("router", "acme", "header")
    assert rc == 0 and doc["router"] == "header" and registry.get_policy("acme").router == "header"
    assert doc["unknown_task"] == "worker" and registry.get_policy("acme").unknown_task is None
    rc, doc = ctl("router", "acme", "--unknown-task", "default")
    assert rc == 0 and doc["unknown_task"] == "default" and registry.get_policy("acme").unknown_task == "default"
    assert registry.get_policy("acme").router == "header"  # only the rule changed

    # refusals: nothing written (no new version, the policy unchanged)
    before = {k: raw_redis.dump(k) for k in keys_under(raw_redis, prefix)}
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps(["x" * 5000]))
    for args, code in [(("onboard", "acme", str(tiny_adapters["a"]), "--task", "code", "--examples", str(empty)), 2),
                       (("onboard", "acme", str(tiny_adapters["a"]), "--examples", str(huge)), 2),
                       (("router", "acme", "--examples", str(lines)), 2),            # no --task
                       (("router", "acme", "--task", "summarize"), 2),               # no --examples
                       (("router", "acme", "--task", "nope", "--examples", str(lines)), 2),  # no such task
                       (("router", "nobody", "classify"), 3), (("router", "nobody"), 3)]:
        rc, doc = ctl(*args)
        assert rc == code, (args, doc)
    assert {k: raw_redis.dump(k) for k in keys_under(raw_redis, prefix)} == before


def _api(redis_url, prefix, tmp_path, tiny_model_dir) -> OnboardingApi:
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"management": {"key": "mgmt"}}))
    cfg = LoraplexConfig.from_mapping({"redis_url": redis_url, "redis_prefix": prefix, "max_rank": 16,
                                       "adapter_store": str(tmp_path / "store"), "base_model_dir": str(tiny_model_dir)})
    return OnboardingApi(cfg, key_file=key_file)


def _req(method, path, query=None, body=b"", ctype=None):
    headers = {"authorization": ["Bearer mgmt"]}
    if ctype:
        headers["content-type"] = [ctype]
    return Request(method, path, query or {}, headers, body)


def test_http_api_examples_and_router(redis_url, prefix, tmp_path, tiny_model_dir, tiny_adapters, registry,
                                      raw_redis):
    api = _api(redis_url, prefix, tmp_path, tiny_model_dir)
    body = json.dumps({"path": str(tiny_adapters["a"]), "examples": ["default one", "default two"]}).encode()
    r = api.handle(_req("POST", "/tenants/web", body=body, ctype="application/json"))
    assert r.status == 200 and r.doc["examples"] == 2, r.doc
    r = api.handle(_req("POST", "/tenants/web", {"task": "summarize", "path": str(tiny_adapters["b"]),
                                                 "examples": json.dumps(["sum it up"])}))
    assert r.status == 200 and r.doc["examples"] == 1, r.doc
    fields = {name: (name, (tiny_adapters["c"] / name).read_bytes())
              for name in ("adapter_config.json", "adapter_model.safetensors")}
    fields["examples"] = ("examples.txt", b"translate this\nsay it in German\n")
    multipart, ctype = urllib3.encode_multipart_formdata(fields)
    r = api.handle(_req("POST", "/tenants/web", {"task": "translate"}, multipart, ctype))
    assert r.status == 200 and r.doc["examples"] == 2, r.doc
    assert registry.get_policy("web").examples == {"default": ("default one", "default two"),
                                                   "summarize": ("sum it up",),
                                                   "translate": ("translate this", "say it in German")}

    r = api.handle(_req("POST", "/tenants/web/router", {"mode": "classify"}))
    assert r.status == 200 and r.doc["router"] == "classify"
    r = api.handle(_req("POST", "/tenants/web/router", {"task": "summarize"}, b'["a", "b"]'))
    assert r.status == 200 and r.doc["examples"]["summarize"] == ["a", "b"] and r.doc["router"] == "classify"
    r = api.handle(_req("PUT", "/tenants/web/router", {"mode": "header", "task": "default", "examples": "x\ny"}))
    assert r.status == 200 and r.doc["router"] == "header" and r.doc["examples"]["default"] == ["x", "y"]
    r = api.handle(_req("GET", "/tenants/web/router"))
    assert r.status == 200 and r.doc == {"tenant": "web", "router": "header",
                                         "examples": {"default": ["x", "y"], "summarize": ["a", "b"],
                                                      "translate": ["translate this", "say it in German"]},
                                         "unknown_task": "worker"}
    r = api.handle(_req("POST", "/tenants/web/router", {"unknown_task": "default"}))
    assert r.status == 200 and r.doc["unknown_task"] == "default" and registry.get_policy("web").unknown_task == "default"
    r = api.handle(_req("POST", "/tenants/web/router", {"unknown_task": "worker"}))
    assert r.status == 200 and r.doc["unknown_task"] == "worker" and registry.get_policy("web").unknown_task is None

    before = {k: raw_redis.dump(k) for k in keys_under(raw_redis, prefix)}
    store_before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*"))
    bad_json = json.dumps({"path": str(tiny_adapters["a"]), "examples": [1]}).encode()
    for req, status in [
        (_req("POST", "/tenants/web/router", {"mode": "sometimes"}), 400),
        (_req("POST", "/tenants/web/router", {"task": "nope", "examples": "x"}), 400),
        (_req("POST", "/tenants/web/router", {"task": "summarize"}), 400),            # no examples
        (_req("POST", "/tenants/web/router", {"examples": "x"}), 400),               # no task
        (_req("POST", "/tenants/web/router"), 400),                                  # nothing to change
        (_req("POST", "/tenants/web/router", {"task": "summarize", "examples": "x"}, b"y"), 400),
        (_req("POST", "/tenants/web/router", {"color": "red"}), 400),
        (_req("POST", "/tenants/web/router", {"unknown_task": "base"}), 400),
        (_req("DELETE", "/tenants/web/router"), 405),
        (_req("POST", "/tenants/nobody/router", {"mode": "classify"}), 404),
        (_req("GET", "/tenants/nobody/router"), 404),
        (_req("POST", "/tenants/web", body=bad_json, ctype="application/json"), 400),
        (_req("POST", "/tenants/web", {"path": str(tiny_adapters["a"]), "examples": "[]"}), 400),
        (Request("POST", "/tenants/web/router", {"mode": "classify"}, {}, b""), 401),
    ]:
        got = api.handle(req)
        assert got.status == status, (req.path, req.query, got.doc)
    assert {k: raw_redis.dump(k) for k in keys_under(raw_redis, prefix)} == before
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*")) == store_before
