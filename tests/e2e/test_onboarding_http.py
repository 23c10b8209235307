"""Onboarding over HTTP end to end: a private TorchServe with loraplex's plugin loaded (its /tenants
endpoints on the management API) and the onboarding service (tenant_registry/http_api.py) beside it,
on the session's real redis-server under this module's own prefix and store, and a real worker
serving what was onboarded. Own ports throughout, so it runs beside the shared stack and the demo."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import requests
import yaml

from loraplex_testing.archive import build_archive
from loraplex_testing.oracle import reference_generate
from loraplex_testing.services import OnboardingService, TorchServe, build_plugin, plugin_config
from loraplex_common.config import LoraplexConfig
from tenant_registry.errors import AdapterInvalid
from tenant_registry.validate import BaseModelSpec, validate_adapter
from tests.registry.hostile import HOSTILE

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e
PREFIX = "onbhttp"
MAX_ADAPTER_BYTES = 10_000_000
QUOTA_TASKS, QUOTA_VERSIONS = 2, 3
NEW_TOKENS = 8


class Stack:
    def __init__(self, ts: TorchServe, svc: OnboardingService, tmp: Path, redis_url: str, model: Path) -> None:
        self.ts, self.svc, self.tmp, self.redis_url, self.model = ts, svc, tmp, redis_url, model
        self.store = tmp / "adapters"
        self.model_config = tmp / "onboarding.yaml"

    def mkey(self) -> str:
        return self.ts.keys()["management"]["key"]

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.mkey()}"}

    def mgmt(self, method: str, path: str, **kw) -> requests.Response:
        """Through TorchServe's management API (the plugin)."""
        return requests.request(method, f"{self.ts.management_url}{path}", timeout=60, **kw)

    def direct(self, method: str, path: str, **kw) -> requests.Response:
        """Straight to the onboarding service on loopback."""
        return requests.request(method, f"{self.svc.url}{path}", timeout=60, **kw)

    def upload(self, tenant: str, src: Path, *, task: str | None = None, headers: dict | None = None,
               route: str = "tenants") -> requests.Response:
        files = [(p.name, (p.name, p.read_bytes())) for p in sorted(src.iterdir()) if p.is_file()]
        params = {"task": task} if task else {}
        return self.direct("POST", f"/{route}/{tenant}", files=files, params=params,
                           headers=self.auth() if headers is None else headers)

    def state(self) -> tuple[list, list]:
        """Everything onboarding could have written: the prefix's Redis keys and values, the store's files."""
        r = redis.Redis.from_url(self.redis_url)
        try:
            keys = sorted(k for k in r.scan_iter(match=f"{PREFIX}:*") if not k.endswith(b":usage"))
            vals = [(k, r.dump(k)) for k in keys]
        finally:
            r.close()
        files = sorted((str(p.relative_to(self.store)), p.read_bytes() if p.is_file() else None)
                       for p in self.store.rglob("*")) if self.store.exists() else []
        return vals, files

    def ask(self, tenant: str, prompt: str) -> dict:
        r = requests.post(f"{self.ts.inference_url}/predictions/loraplex", timeout=120,
                          headers={"Authorization": f"Bearer {self.ts.keys()['inference']['key']}",
                                   "X-Tenant-ID": tenant},
                          json={"prompt": prompt, "max_new_tokens": NEW_TOKENS})
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def onb(tiny_model_dir, redis_url, tmp_path_factory) -> Stack:
    build_plugin()
    tmp = tmp_path_factory.mktemp("onbhttp")
    cfg = yaml.safe_load((ROOT / "model-config.yaml").read_text())
    cfg["handler"].update({"num_slots": 4, "base_model_name": "", "max_new_tokens_cap": 32, "registry_cache_s": 30})
    (tmp / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    build_archive(tiny_model_dir, tmp / "model_store", config_file=tmp / "model-config.yaml")
    (tmp / "onboarding.yaml").write_text(yaml.safe_dump({"handler": {
        "redis_url": redis_url, "redis_prefix": PREFIX, "adapter_store": str(tmp / "adapters"),
        "base_model_dir": str(tiny_model_dir), "max_rank": 16, "max_adapter_bytes": MAX_ADAPTER_BYTES,
        "quota_max_tasks": QUOTA_TASKS, "quota_max_versions": QUOTA_VERSIONS}}))
    env = {"LORAPLEX_REDIS_URL": redis_url, "LORAPLEX_ADAPTER_STORE": str(tmp / "adapters"),
           "LORAPLEX_REDIS_PREFIX": PREFIX}
    svc = OnboardingService(tmp / "onboarding", tmp / "onboarding.yaml", tmp / "ts" / "key_file.json")
    ts = TorchServe(tmp / "ts", tmp / "model_store", env=env, extra_config=plugin_config(svc.url))
    try:
        svc.start()
        ts.start(timeout=240)
        yield Stack(ts, svc, tmp, redis_url, tiny_model_dir)
    finally:
        ts.stop()
        svc.stop()


def _expected(model: Path, adapter: Path, prompt: str) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    return tok.decode(reference_generate(model, adapter, tok(prompt)["input_ids"], NEW_TOKENS),
                      skip_special_tokens=True)


def test_plugin_endpoints_need_the_management_token(onb):
    # Through TorchServe: its own token check answers first (400, TorchServe's answer), also for a
    # wrong token and for the inference token.
    for headers in ({}, {"Authorization": "Bearer nope"},
                    {"Authorization": f"Bearer {onb.ts.keys()['inference']['key']}"}):
        r = onb.mgmt("GET", "/tenants", headers=headers)
        assert r.status_code in (400, 401) and "Token Authorization failed" in r.text, r.text
    # Straight to the loopback service: it checks the same token itself.
    for headers in ({}, {"Authorization": "Bearer nope"},
                    {"Authorization": f"Bearer {onb.ts.keys()['inference']['key']}"}):
        for method, path in (("GET", "/tenants"), ("GET", "/tenants/acme"), ("POST", "/tenants/acme/disable"),
                             ("DELETE", "/tenants/acme"), ("POST", "/tenants/acme/rotate-key")):
            r = onb.direct(method, path, headers=headers)
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"]["type"] == "Unauthorized"
    assert onb.mgmt("GET", "/tenants", headers=onb.auth()).status_code == 200


def test_every_endpoint_over_http(onb, tiny_adapters):
    a = onb.auth()
    # create by upload (the service), then a new version from a server path through TorchServe's 8081
    r = onb.upload("acme", tiny_adapters["a"])
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["adapter_id"] == "acme@v1" and first["tenant_key"].startswith("lpx_")
    r = onb.mgmt("POST", "/tenants/acme", params={"path": str(tiny_adapters["b"])}, headers=a)
    assert r.status_code == 200, r.text
    assert r.json()["adapter_id"] == "acme@v2" and r.json()["tenant_key"] is None  # key issued once only
    r = onb.mgmt("PUT", "/tenants/acme", params={"path": f"file://{tiny_adapters['c']}", "task": "qa"}, headers=a)
    assert r.status_code == 200 and r.json()["adapter_id"] == "acme:qa@v3", r.text
    # an upload through TorchServe cannot work on 0.12 (the body is gone): 501 naming why
    files = [(p.name, (p.name, p.read_bytes())) for p in sorted(tiny_adapters["a"].iterdir())]
    r = onb.mgmt("POST", "/tenants/acme", files=files, headers=a)
    assert r.status_code == 501 and "drops request bodies" in r.text, r.text

    r = onb.mgmt("GET", "/tenants", headers=a)
    assert r.status_code == 200
    assert [(t["tenant_id"], t["adapter_id"]) for t in r.json()["tenants"] if t["tenant_id"] == "acme"] == \
        [("acme", "acme@v2"), ("acme", "acme:qa@v3")]
    r = onb.mgmt("GET", "/tenants/acme", headers=a)
    doc = r.json()
    assert r.status_code == 200 and sorted(doc["tasks"]) == ["default", "qa"]
    assert [h["version"] for h in doc["tasks"]["default"]["history"]] == [1, 2] and doc["key"] is not None
    assert doc["quota"]["usage"]["versions"] == {"default": 2, "qa": 1}

    r = onb.mgmt("POST", "/tenants/acme/disable", headers=a)
    assert r.status_code == 200 and r.json()["record"]["status"] == "disabled"
    r = onb.mgmt("POST", "/tenants/acme/enable", headers=a)
    assert r.status_code == 200 and r.json()["record"]["status"] == "enabled"
    r = onb.mgmt("POST", "/tenants/acme/rollback", headers=a)
    assert r.status_code == 200 and r.json()["record"]["adapter_id"] == "acme@v1"
    r = onb.mgmt("POST", "/tenants/acme/rollback", params={"to": "2"}, headers=a)
    assert r.status_code == 200 and r.json()["record"]["adapter_id"] == "acme@v2"
    r = onb.mgmt("POST", "/tenants/acme/rollback", params={"to": "9"}, headers=a)
    assert r.status_code == 404 and r.json()["error"]["type"] == "VersionNotFound"
    r = onb.mgmt("POST", "/tenants/acme/rollback", params={"task": "qa"}, headers=a)
    assert r.status_code == 404  # nothing older to roll back to

    r = onb.mgmt("POST", "/tenants/acme/rotate-key", headers=a)
    assert r.status_code == 200 and r.json()["tenant_key"] != first["tenant_key"]
    # A/B split through TorchServe (the query form: no body) and with a JSON body on the service itself
    r = onb.mgmt("PUT", "/tenants/acme/split", params={"task": "default", "arms": "v1=90,v2=10"}, headers=a)
    assert r.status_code == 200 and r.json()["splits"] == {"default": [{"version": 1, "weight": 90},
                                                                       {"version": 2, "weight": 10}]}, r.text
    assert onb.mgmt("PUT", "/tenants/acme/split", headers=a).status_code == 400  # no arms
    assert onb.mgmt("PUT", "/tenants/acme/split", json={"arms": {"v1": 1}}, headers=a).status_code == 501
    r = onb.direct("POST", "/tenants/acme/split", json={"task": "qa", "arms": {"v3": 1}}, headers=a)
    assert r.status_code == 200 and sorted(r.json()["splits"]) == ["default", "qa"], r.text
    assert onb.mgmt("GET", "/tenants/acme", headers=a).json()["tasks"]["qa"]["split"] == [{"version": 3, "weight": 1}]
    r = onb.mgmt("DELETE", "/tenants/acme/split", headers=a)
    assert r.status_code == 200 and r.json()["splits"] == {}
    # fallback chain through TorchServe (query form), with a JSON body on the service itself; refusals
    r = onb.mgmt("PUT", "/tenants/acme/chain", params={"links": "qa,default@v1,base", "threshold": "-2"}, headers=a)
    assert r.status_code == 200 and r.json()["chain"] == ["qa", "default@v1", "base"], r.text
    assert onb.mgmt("GET", "/tenants/acme/chain", headers=a).json()["chain_threshold"] == -2
    r = onb.direct("POST", "/tenants/acme/chain", json={"links": ["default", "base"], "threshold": -1.5}, headers=a)
    assert r.status_code == 200 and r.json()["chain"] == ["default", "base"], r.text
    for params in ({"links": "default,base"}, {"links": "nosuch,base", "threshold": "-1"},
                   {"links": "default", "threshold": "-1"}):
        assert onb.mgmt("PUT", "/tenants/acme/chain", params=params, headers=a).status_code in (400, 404), params
    no_token = onb.mgmt("PUT", "/tenants/acme/chain", params={"links": "default,base", "threshold": "-1"})
    assert no_token.status_code in (400, 401) and "Token Authorization failed" in no_token.text  # TorchServe's check
    assert onb.direct("PUT", "/tenants/acme/chain", json={"links": ["base"], "threshold": -1}).status_code == 401
    assert onb.mgmt("GET", "/tenants/acme/chain", headers=a).json()["chain"] == ["default", "base"]  # unchanged
    r = onb.mgmt("DELETE", "/tenants/acme/chain", headers=a)
    assert r.status_code == 200 and r.json()["chain"] == []

    for path, status in (("/tenants/nobody", 404), ("/tenants/Bad..Id", 400), ("/tenants/acme/frobnicate", 404)):
        assert onb.mgmt("GET", path, headers=a).status_code == status, path
    assert onb.mgmt("POST", "/tenants/acme", params={"task": "Bad:Task", "path": str(tiny_adapters["a"])},
                    headers=a).status_code == 400
    assert onb.mgmt("POST", "/tenants/acme", params={"path": "relative/dir"}, headers=a).status_code == 400

    r = onb.mgmt("DELETE", "/tenants/acme", params={"task": "qa"}, headers=a)
    assert r.status_code == 200 and r.json()["versions"] == [3]
    assert not (onb.store / "acme" / "v3").exists() and (onb.store / "acme" / "v2").exists()
    r = onb.mgmt("DELETE", "/tenants/acme", headers=a)
    assert r.status_code == 200 and sorted(r.json()["versions"]) == [1, 2]
    assert not (onb.store / "acme").exists()
    assert onb.mgmt("GET", "/tenants/acme", headers=a).status_code == 404


def _hostile_dirs(tiny_adapters, tmp: Path):
    for build in HOSTILE:
        src = tmp / build.__name__ / "src"
        shutil.copytree(tiny_adapters["a"], src)
        outside = tmp / build.__name__ / "outside"
        outside.mkdir()
        yield build.__name__, build(src, outside), src


def test_hostile_uploads_get_the_cli_refusal_and_nothing_is_written(onb, tiny_adapters, tmp_path):
    a = onb.auth()
    assert onb.upload("victim", tiny_adapters["a"]).status_code == 200  # an existing tenant, so a write would show
    spec = BaseModelSpec.from_model_dir(onb.model)
    cfg = LoraplexConfig.load(onb.model_config, env={})
    before = onb.state()
    seen = set()
    for name, code, src in _hostile_dirs(tiny_adapters, tmp_path):
        if name == "other_base_model":  # refused only under a base_model_name (test_validate sets one)
            continue
        # What tenantctl prints for this directory: the same validation, in process.
        with pytest.raises(AdapterInvalid) as ei:
            validate_adapter(src, spec, max_rank=cfg.max_rank, max_bytes=cfg.max_adapter_bytes,
                             base_model_name=cfg.base_model_name, allowed_targets=cfg.target_modules)
        cli_message = str(ei.value)
        entries = list(src.iterdir())
        special = any(p.is_symlink() or not p.is_file() for p in entries)
        big = sum(p.stat().st_size for p in entries if p.is_file() and not p.is_symlink()) > MAX_ADAPTER_BYTES
        if special or big:  # a link, a FIFO or an oversized file cannot be an upload: the server reads the dir
            r = onb.mgmt("POST", "/tenants/victim", params={"path": str(src)}, headers=a)
        else:
            r = onb.upload("victim", src)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] == code, (name, err)
        assert err["message"] == cli_message, (name, err["message"], cli_message)
        seen.add(code)
        assert onb.state() == before, name
    assert {"pickle_file", "symlink", "corrupt_safetensors", "shape_mismatch", "too_large"} <= seen
    # And the real CLI says the same for one of them.
    name, code, src = next(x for x in _hostile_dirs(tiny_adapters, tmp_path / "cli") if x[0] == "wrong_shape_in")
    p = subprocess.run([str(Path(sys.executable).parent / "tenantctl"), "--json", "--model-config",
                        str(onb.model_config), "onboard", "victim", str(src)], capture_output=True, text=True,
                       timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 4
    r = onb.upload("victim", src)
    assert r.json()["error"]["message"] == json.loads(p.stdout)["error"]["message"]
    assert onb.state() == before


def test_upload_path_tricks_are_refused(onb, tiny_adapters):
    good = {p.name: p.read_bytes() for p in tiny_adapters["a"].iterdir()}
    before = onb.state()
    tricks = ["../adapter_config.json", "sub/adapter_model.safetensors", "/etc/passwd", ".hidden", "..", "%2e%2e%2fx"]
    for bad in tricks:
        files = [(n, (n, data)) for n, data in good.items()] + [("extra", (bad, b"x"))]
        r = onb.direct("POST", "/tenants/trick", files=files, headers=onb.auth())
        assert r.status_code == 400, (bad, r.text)
        assert onb.state() == before, bad
    # The same file twice is refused too.
    files = [(n, (n, data)) for n, data in good.items()] * 2
    assert onb.direct("POST", "/tenants/trick", files=files, headers=onb.auth()).status_code == 400
    # A body beyond the upload limit is 413 before it is read.
    r = onb.direct("POST", "/tenants/trick", data=b"\0" * (MAX_ADAPTER_BYTES + 3_000_000),
                   headers={**onb.auth(), "Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413
    assert onb.state() == before
    # The form field names the file (curl -F adapter_config.json=@local/name): any plain local name works.
    files = [(n, (f"local-{i}.bin", data)) for i, (n, data) in enumerate(sorted(good.items()))]
    r = onb.direct("POST", "/tenants/curlstyle", files=files, headers=onb.auth())
    assert r.status_code == 200 and r.json()["adapter_id"] == "curlstyle@v1", r.text


def test_tenant_key_publishes_only_to_its_own_tenant(onb, tiny_adapters):
    ka = onb.upload("own-a", tiny_adapters["a"]).json()["tenant_key"]
    kb = onb.upload("own-b", tiny_adapters["a"]).json()["tenant_key"]
    r = onb.upload("own-a", tiny_adapters["b"], route="tenant-adapters", headers={"X-Tenant-Key": ka})
    assert r.status_code == 200 and r.json()["adapter_id"] == "own-a@v2", r.text
    r = onb.upload("own-a", tiny_adapters["b"], route="tenant-adapters", task="qa",
                   headers={"X-Tenant-ID": "own-a", "X-Tenant-Key": ka})
    assert r.status_code == 200 and r.json()["adapter_id"] == "own-a:qa@v3", r.text
    before = onb.state()
    # b's key, naming itself, on a's tenant: 403; b's key claiming to be a: 401; no key / the management token: 401
    r = onb.upload("own-a", tiny_adapters["c"], route="tenant-adapters", headers={"X-Tenant-ID": "own-b",
                                                                                  "X-Tenant-Key": kb})
    assert r.status_code == 403, r.text
    for headers in ({"X-Tenant-Key": kb}, {}, onb.auth(), {"X-Tenant-ID": "own-a", "X-Tenant-Key": "lpx_wrong"}):
        r = onb.upload("own-a", tiny_adapters["c"], route="tenant-adapters", headers=headers)
        assert r.status_code == 401, (headers, r.text)
    # a tenant may not make the server read a path
    r = onb.direct("POST", "/tenant-adapters/own-a", params={"path": str(tiny_adapters["c"])},
                   headers={"X-Tenant-Key": ka})
    assert r.status_code == 400
    # the tenant key is no management token
    assert onb.direct("GET", "/tenants", headers={"Authorization": f"Bearer {ka}"}).status_code == 401
    assert onb.state() == before
    # a disabled tenant cannot publish (403) until enabled again
    assert onb.mgmt("POST", "/tenants/own-a/disable", headers=onb.auth()).status_code == 200
    r = onb.upload("own-a", tiny_adapters["c"], route="tenant-adapters", headers={"X-Tenant-Key": ka})
    assert r.status_code == 403 and r.json()["error"]["type"] == "TenantDisabled"


def test_quota_overruns(onb, tiny_adapters):
    key = onb.upload("quota", tiny_adapters["a"]).json()["tenant_key"]
    pub = {"X-Tenant-Key": key}
    for _ in range(QUOTA_VERSIONS - 1):
        assert onb.upload("quota", tiny_adapters["a"], route="tenant-adapters", headers=pub).status_code == 200
    before = onb.state()
    r = onb.upload("quota", tiny_adapters["a"], route="tenant-adapters", headers=pub)
    assert r.status_code == 409 and r.json()["error"]["code"] == "quota_versions", r.text
    assert "quota_max_versions" in r.json()["error"]["message"]
    assert onb.state() == before
    assert onb.upload("quota", tiny_adapters["a"], route="tenant-adapters", task="t2", headers=pub).status_code == 200
    before = onb.state()
    r = onb.upload("quota", tiny_adapters["a"], route="tenant-adapters", task="t3", headers=pub)
    assert r.status_code == 409 and r.json()["error"]["code"] == "quota_tasks", r.text
    r = onb.upload("quota", tiny_adapters["a"], task="t3")  # the operator is held to it too
    assert r.status_code == 409
    assert onb.state() == before


def test_a_version_onboarded_over_http_is_served(onb, tiny_adapters):
    prompt = "the quick brown fox"
    r = onb.upload("served", tiny_adapters["b"])
    assert r.status_code == 200, r.text
    key = r.json()["tenant_key"]
    got = onb.ask("served", prompt)
    assert got["adapter"] == "served@v1" and got["text"] == _expected(onb.model, tiny_adapters["b"], prompt)
    r = onb.upload("served", tiny_adapters["c"], route="tenant-adapters", headers={"X-Tenant-Key": key})
    assert r.status_code == 200, r.text
    got = onb.ask("served", prompt)  # the registry event makes the worker drop v1
    assert got["adapter"] == "served@v2" and got["text"] == _expected(onb.model, tiny_adapters["c"], prompt)
    assert got["text"] != _expected(onb.model, None, prompt)


def test_the_service_refuses_an_expired_or_missing_management_key(onb, tmp_path):
    """The loopback service's own token check, in process: the key file's "expiration time" counts,
    and a missing key file refuses everything (never an open door)."""
    from tenant_registry.http_api import OnboardingApi, Request

    cfg = LoraplexConfig.load(onb.model_config, env={})
    kf = tmp_path / "key_file.json"
    api = OnboardingApi(cfg, key_file=kf)
    req = Request("GET", "/tenants", {}, {"authorization": ["Bearer sekrit"]}, b"")
    assert api.handle(req).status == 401  # no key file
    kf.write_text(json.dumps({"management": {"key": "sekrit", "expiration time": "2999-01-01T00:00:00.1Z"}}))
    assert api.handle(req).status == 200
    kf.write_text(json.dumps({"management": {"key": "sekrit", "expiration time": "2001-01-01T00:00:00.1Z"}}))
    assert api.handle(req).status == 401
    kf.write_text(json.dumps({"management": {"key": "sekrit"}}))
    assert api.handle(req).status == 200
    assert api.handle(Request("GET", "/tenants", {}, {"authorization": ["Bearer sekri"]}, b"")).status == 401


def test_task_router_endpoints_over_http(onb, tiny_adapters):
    """The task router's endpoints (issue 14 item 2): a task's example prompts declared with its upload
    (a multipart `examples` part, the service) and with a server path through TorchServe's 8081
    (`?examples=<JSON list>`: no body passes the plugin), the router set through 8081, and the worker
    routes by them. The random model ranks only the examples themselves, so the prompt is one."""
    a = onb.auth()
    files = [(p.name, (p.name, p.read_bytes())) for p in sorted(tiny_adapters["a"].iterdir()) if p.is_file()]
    r = onb.direct("POST", "/tenants/rtr", headers=a,
                   files=files + [("examples", ("examples.txt", b"numbers 0 1 2 3 4 5\n"))])
    assert r.status_code == 200 and r.json()["examples"] == 1, r.text
    prompt = "the quick brown fox jumps over the lazy dog."
    r = onb.mgmt("POST", "/tenants/rtr", headers=a, params={"task": "summarize", "path": str(tiny_adapters["b"]),
                                                             "examples": json.dumps([prompt])})
    assert r.status_code == 200 and r.json()["examples"] == 1, r.text
    r = onb.mgmt("POST", "/tenants/rtr/router", params={"mode": "classify"}, headers=a)
    assert r.status_code == 200 and r.json()["router"] == "classify", r.text
    r = onb.mgmt("GET", "/tenants/rtr/router", headers=a)
    assert r.status_code == 200 and r.json()["examples"] == {"default": ["numbers 0 1 2 3 4 5"], "summarize": [prompt]}
    got = onb.ask("rtr", prompt)
    assert got["task"] == "summarize" and got["route"]["by"] == "classify", got
    assert got["text"] == _expected(onb.model, tiny_adapters["b"], prompt)
    for params, status in (({"mode": "sometimes"}, 400), ({"task": "nope", "examples": "x"}, 400), ({}, 400)):
        r = onb.mgmt("POST", "/tenants/rtr/router", params=params, headers=a)
        assert r.status_code == status, (params, r.text)
    assert onb.mgmt("GET", "/tenants/rtr/router", headers=a).json()["router"] == "classify"  # unchanged
    assert onb.mgmt("POST", "/tenants/nobody/router", params={"mode": "classify"}, headers=a).status_code == 404
    assert onb.mgmt("DELETE", "/tenants/rtr", headers=a).status_code == 200
